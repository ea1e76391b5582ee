"""A sleep effect: a timer in the worker loop, no process."""

from __future__ import annotations

import time
from typing import Any

from effectd.daemon.kinds.base import OutputChunk, Phase, Run


class SleepRun(Run):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.until = time.monotonic() + float(self.spec["seconds"])

    def stop(self, state: str, reason: str) -> None:
        if self.phase is Phase.RUNNING:
            self.end_state, self.end_reason = state, reason
            self.phase = Phase.KILLING

    def tick(self, now: float) -> list[OutputChunk]:
        mono = time.monotonic()
        if self.phase is Phase.DONE:
            return []
        if self.phase is Phase.KILLING:
            return self._finish(self.end_state or "cancelled", reason=self.end_reason)
        if self.deadline is not None and mono >= self.deadline and self.deadline < self.until:
            return self._finish("timed_out", reason="timeout")
        if mono >= self.until:
            return self._finish("succeeded", result=None)
        return []

    def next_deadline(self) -> float | None:
        if self.phase is Phase.KILLING:
            return time.monotonic()
        return min(self.until, self.deadline) if self.deadline is not None else self.until
