"""Typed records the client returns (built from the daemon's reply maps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from effectd.ipc.schema import FINAL_STATES, EffectState


@dataclass(frozen=True)
class EffectError:
    type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True)
class EffectRecord:
    """One effect as the daemon knows it. ``state`` is an :class:`EffectState`."""

    id: str
    kind: str
    state: EffectState
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    attempt: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    result: Any = None
    error: EffectError | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    leaked_processes: int = 0
    progress: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state is EffectState.SUCCEEDED

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @classmethod
    def from_wire(cls, rec: dict[str, Any]) -> EffectRecord:
        err = rec.get("error")
        return cls(
            id=rec["id"], kind=rec.get("kind", "?"), state=EffectState(rec["state"]),
            name=rec.get("name"), labels=rec.get("labels") or {}, reason=rec.get("reason"),
            attempt=rec.get("attempt") or 0, attempts=rec.get("attempts") or [],
            submitted_at=rec.get("submitted_at"), started_at=rec.get("started_at"),
            finished_at=rec.get("finished_at"), pid=rec.get("pid"), exit_code=rec.get("exit_code"),
            signal=rec.get("signal"), result=rec.get("result"),
            error=EffectError(err.get("type", "?"), err.get("message", ""), err.get("traceback", ""))
            if isinstance(err, dict) else None,
            sizes=rec.get("sizes") or {}, truncated=rec.get("truncated") or {},
            leaked_processes=rec.get("leaked_processes") or 0,
            progress=rec.get("progress"), spec=rec.get("spec") or {},
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (for ``--json`` output and the stdio bridge)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["state"] = self.state.value
        out["error"] = None if self.error is None else vars(self.error)
        return out


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
