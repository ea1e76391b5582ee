"""Durable state: the SQLite journal of effect lifecycle events and the per-effect output files."""

from effectd.journal.outputs import OutputStore
from effectd.journal.store import Journal, JournalCorrupt

__all__ = ["Journal", "JournalCorrupt", "OutputStore"]
