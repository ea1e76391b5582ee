"""Bounded disk: retention of final effects by age, count and total output bytes.

Runs periodically and on demand (``gc`` op / ``effectctl gc``). Only final effects are ever
deleted, oldest first, together with their journal rows, events and output files, so the state
dir stays bounded whatever the load. Defaults are documented in README ("Limits and defaults").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from effectd.ipc.constants import (
    DEFAULT_RETAIN_BYTES,
    DEFAULT_RETAIN_COUNT,
    DEFAULT_RETAIN_DAYS,
    MIN_KEY_WINDOW_DAYS,
)
from effectd.journal import Journal, OutputStore

log = logging.getLogger("effectd.retention")

GC_INTERVAL = 300.0


@dataclass
class Retention:
    journal: Journal
    outputs: OutputStore
    retain_days: float = DEFAULT_RETAIN_DAYS
    retain_count: int = DEFAULT_RETAIN_COUNT
    retain_bytes: int = DEFAULT_RETAIN_BYTES
    last_run: float = 0.0
    on_deleted: Callable[[list[str]], None] | None = None
    """Told the ids of deleted effects once their deletion is staged (parked waits wake)."""

    @property
    def key_window_days(self) -> float:
        """How long a request key outlives its submit (the configured retention, not a ``gc``
        op's one-off override: the window is a promise to clients)."""
        return max(self.retain_days, MIN_KEY_WINDOW_DAYS)

    def due(self, now: float) -> bool:
        return now - self.last_run >= GC_INTERVAL

    def collect(self, retain_days: float | None = None, retain_count: int | None = None,
                retain_bytes: int | None = None) -> dict[str, Any]:
        """Delete final effects beyond the limits; returns what was freed."""
        days = self.retain_days if retain_days is None else retain_days
        count = self.retain_count if retain_count is None else retain_count
        max_bytes = self.retain_bytes if retain_bytes is None else retain_bytes
        self.last_run = time.monotonic()
        cutoff = time.time() - days * 86400
        kept = 0
        kept_bytes = 0
        doomed: list[str] = []
        # Newest first: an effect is kept while it fits every limit (count, bytes, age).
        for rec in self.journal.iter_final_newest_first():
            size = sum((rec.get("sizes") or {}).values())
            finished = rec.get("finished_at") or rec.get("submitted_at") or 0.0
            if kept < count and kept_bytes + size <= max_bytes and finished >= cutoff:
                kept += 1
                kept_bytes += size
            else:
                doomed.append(rec["id"])
        freed = 0
        for eid in doomed:
            freed += self.outputs.remove(eid)
        for start in range(0, len(doomed), 500):
            self.journal.delete_effects(doomed[start:start + 500])
        self.journal.prune_request_keys(time.time() - self.key_window_days * 86400)
        if doomed and self.on_deleted is not None:
            self.on_deleted(doomed)
        if doomed:
            log.info("gc removed %d effects, freed %d output bytes", len(doomed), freed)
        return {"removed": len(doomed), "freed_bytes": freed, "kept": kept, "kept_bytes": kept_bytes}
