"""Effect records (protocol.md §7.1) and control replies, declared once.

The daemon builds an :class:`EffectRecord` in ``Effect.to_record`` (the journal stores it, the
replies carry it); the client decodes reply maps into the same class. Field order is the key
order on the wire. tests/test_protocol_doc.py checks protocol.md's tables against these classes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from effectd.ipc.schema import FINAL_STATES, EffectState


class EffectError(msgspec.Struct, frozen=True, kw_only=True):
    """Why a python effect raised or a shell effect could not start."""

    type: str = "?"
    message: str = ""
    traceback: str = ""


class EffectRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One effect as the daemon knows it; ``state`` is an :class:`EffectState`. The daemon builds
    it in ``Effect.to_record``; the client decodes replies into it."""

    id: str
    kind: str = "?"
    name: str | None = None
    labels: dict[str, str] = {}
    state: EffectState
    reason: str | None = None
    attempt: int = 0
    attempts: list[dict[str, Any]] = []
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    pid: int | None = None
    create_time: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    result: Any = None
    error: EffectError | None = None
    sizes: dict[str, int] = {}
    truncated: dict[str, int] = {}
    leaked_processes: int = 0
    progress: dict[str, Any] | None = None
    not_before: float = 0.0
    cancel_requested: str | None = None
    spec: dict[str, Any] = {}

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
    def from_wire(cls, rec: Any) -> EffectRecord:
        """A record from a decoded reply map (nil values mean "absent")."""
        if isinstance(rec, dict):
            rec = {k: v for k, v in rec.items() if v is not None}
        return msgspec.convert(rec, cls)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (for ``--json`` output and the stdio bridge): the client's view,
        without the daemon-internal fields."""
        out = record_map(self)
        for name in _INTERNAL_RECORD_FIELDS:
            out.pop(name, None)
        return out


_INTERNAL_RECORD_FIELDS = ("worker", "create_time", "not_before", "cancel_requested")


def record_map(record: EffectRecord) -> dict[str, Any]:
    """The record as the msgpack map the journal stores and replies carry. Shallow (the spec and
    result are not copied): this runs on every journaled change."""
    out = msgspec.structs.asdict(record)
    out["state"] = record.state.value
    if record.error is not None:
        out["error"] = msgspec.structs.asdict(record.error)
    return out


def effect_error(error: dict[str, Any] | None) -> EffectError | None:
    """A worker's error map (``finished.error``) as the record's :class:`EffectError`."""
    if error is None:
        return None
    return EffectError(type=str(error.get("type", "?")), message=str(error.get("message", "")),
                       traceback=str(error.get("traceback", "")))
