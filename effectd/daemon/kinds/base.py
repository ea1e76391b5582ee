"""What every kind of effect run shares: its phases, its output chunks and its completion report.

A run never blocks the worker's loop: it exposes file descriptors to poll and a ``tick`` to call,
returns output chunks for the worker to publish, and ends with a completion report. One module
per kind implements it: :mod:`.shell`, :mod:`.python`, :mod:`.sleep`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from effectd.daemon.output import OutputWriter

READ_CHUNK = 64 * 1024
"""Bytes read from an output pipe at a time."""


@dataclass(frozen=True)
class OutputChunk:
    """Bytes of one output stream of a run, at their offset in its file, to publish."""

    stream: str
    offset: int
    data: bytes


class Phase(str, Enum):
    RUNNING = "running"
    KILLING = "killing"
    DONE = "done"


class Run:
    """Common state of one attempt of one effect."""

    def __init__(self, effect_id: str, attempt: int, spec: dict[str, Any], writer: OutputWriter,
                 kill_grace: float) -> None:
        self.effect_id = effect_id
        self.attempt = attempt
        self.spec = spec
        self.writer = writer
        self.kill_grace = kill_grace
        self.started_at = time.time()
        timeout = spec.get("timeout")
        self.deadline = time.monotonic() + float(timeout) if timeout else None
        self.phase = Phase.RUNNING
        self.end_state: str | None = None   # set by cancel/timeout before the kill completes
        self.end_reason: str | None = None
        self.report: dict[str, Any] | None = None
        self.pid: int | None = None
        self.create_time: float | None = None
        self.progress: list[tuple[float | None, str | None]] = []

    def fds(self) -> list[int]:
        return []

    def on_readable(self, fd: int) -> list[OutputChunk]:
        return []

    def tick(self, now: float) -> list[OutputChunk]:
        return []

    def stop(self, state: str, reason: str) -> None:
        raise NotImplementedError

    def next_deadline(self) -> float | None:
        return self.deadline

    def running_report(self) -> dict[str, Any]:
        return {"id": self.effect_id, "attempt": self.attempt, "pid": self.pid,
                "create_time": self.create_time, "sizes": self.writer.sizes(), "started_at": self.started_at}

    def _finish(self, state: str, **fields: Any) -> list[OutputChunk]:
        chunks = [OutputChunk(s, off, data) for s, off, data in self.writer.finish()]
        if state == "succeeded" and self.writer.write_error is not None:
            # Output went missing (e.g. disk full): not a success anyone may build on.
            state, fields["reason"] = "failed", self.writer.write_error
        self.report = {
            "id": self.effect_id, "attempt": self.attempt, "state": state,
            "sizes": self.writer.sizes(), "truncated": self.writer.truncated(),
            "started_at": self.started_at, "finished_at": time.time(), **fields,
        }
        self.phase = Phase.DONE
        return chunks

