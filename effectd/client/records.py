"""Typed records the client returns (built from the daemon's reply maps).

:class:`EffectRecord` and :class:`EffectError` are declared once, in effectd/ipc/records.py (the
daemon builds the same class); they are re-exported here, where the client's users import them."""

from __future__ import annotations

from dataclasses import dataclass

from effectd.ipc.records import EffectError, EffectRecord
from effectd.ipc.schema import EffectState

__all__ = ["Chunk", "EffectError", "EffectRecord", "OutputSlice"]


@dataclass(frozen=True)
class Chunk:
    """A piece of an effect's output: ``data`` starts at byte ``offset`` of ``stream``."""

    stream: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class OutputSlice:
    id: str
    stream: str
    offset: int
    data: bytes
    next_offset: int
    size: int
    state: EffectState
    eof: bool
