"""Effect records (protocol.md §7.1) and control replies, declared once.

The daemon builds an :class:`EffectRecord` in ``Effect.to_record`` (the journal stores it, the
replies carry it); the client decodes reply maps into the same class. Field order is the key
order on the wire. tests/test_protocol_doc.py checks protocol.md's tables against these classes.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from effectd.ipc.schema import FINAL_STATES, PROTOCOL_VERSION, EffectState


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


# --------------------------------------------------------------------------------------------
# Control replies (protocol.md §3.2, §5): the envelope, then the op's fields, in this order.
# Records inside a reply travel pre-encoded (msgspec.Raw): the daemon encodes each once, within
# the reply budget, or splices in the journal's stored bytes as they are.

PackedRecord = msgspec.Raw


class Reply(msgspec.Struct, kw_only=True):
    """A successful reply; the server sets ``rid`` (echoed from the request)."""

    v: int = PROTOCOL_VERSION
    rid: Any = None
    ok: bool = True


class ErrorInfo(msgspec.Struct):
    code: str
    message: str


class ErrorReply(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    rid: Any = None
    ok: bool = False
    error: ErrorInfo


class WorkerInfo(msgspec.Struct, kw_only=True):
    id: str
    pid: int | None
    state: str
    effects: int
    effects_done: int
    rss: int


class LoopInfo(msgspec.Struct, kw_only=True):
    worst_turn: float
    deaf_seconds: float


class LimitsInfo(msgspec.Struct, kw_only=True):
    parallel: int
    max_workers: int
    max_queued: int
    max_output_bytes: int


class HelloReply(Reply, kw_only=True):
    protocol: int
    min_protocol: int
    max_protocol: int
    capabilities: list[str]
    daemon_version: str
    instance: str
    pid: int
    uptime: float
    journal_commits: int
    counts: dict[str, int]
    workers: list[WorkerInfo]
    worker_crashes: int
    worker_crashes_recent: int
    spawn_backoff: float
    draining: bool
    loop: LoopInfo
    read_inflight: int
    read_busy: int
    managed_by: str
    runtime_dir: str
    state_dir: str
    limits: LimitsInfo


class SubmitReply(Reply, kw_only=True):
    id: str
    state: str


class SubmitManyReply(Reply, kw_only=True):
    ids: list[str]


R = TypeVar("R")
"""The type of a reply's records: ``msgspec.Raw`` where the daemon builds the reply (records
pre-encoded), the decoded record map where a client reads it."""


class StatusReply(Reply, Generic[R], kw_only=True):
    effects: list[R]


class ListReply(Reply, Generic[R], kw_only=True):
    effects: list[R]
    truncated: bool


class WaitReply(Reply, Generic[R], kw_only=True):
    effects: list[R]
    done: list[str]
    timed_out: bool


class ResultReply(Reply, kw_only=True):
    id: str
    state: str
    reason: str | None
    exit_code: int | None
    signal: int | None
    result: Any
    error: dict[str, Any] | None
    attempt: int
    sizes: dict[str, int]
    truncated: dict[str, int]
    leaked_processes: int


class CancelOutcome(msgspec.Struct, kw_only=True):
    id: str
    state: str
    cancelled: bool


class CancelReply(Reply, kw_only=True):
    effects: list[CancelOutcome]


class ReadOutputReply(Reply, kw_only=True):
    id: str
    stream: str
    offset: int
    data: bytes
    next_offset: int
    size: int
    state: str
    final: bool
    eof: bool


class GroupSetReply(Reply, kw_only=True):
    name: str
    parallel: int | None


class GroupInfo(msgspec.Struct, kw_only=True):
    name: str
    parallel: int | None
    running: int = 0
    queued: int = 0


class GroupsReply(Reply, kw_only=True):
    groups: list[GroupInfo]


class GcReply(Reply, kw_only=True):
    removed: int
    freed_bytes: int
    kept: int
    kept_bytes: int


class ShutdownReply(Reply, kw_only=True):
    stopping: bool
    drain: bool


REPLIES: dict[str, type[Reply]] = {
    "hello": HelloReply, "submit": SubmitReply, "submit_many": SubmitManyReply, "status": StatusReply,
    "list": ListReply, "wait": WaitReply, "result": ResultReply, "cancel": CancelReply,
    "read_output": ReadOutputReply, "group_set": GroupSetReply, "groups": GroupsReply, "gc": GcReply,
    "shutdown": ShutdownReply,
}
"""The reply of every op (tests check it against schema.OPS and protocol.md)."""

WireRecord = dict[str, Any]
"""A record as a client first decodes it (``EffectRecord.from_wire`` then reads it: nil means absent)."""

CLIENT_REPLIES: dict[str, type[Reply]] = {
    **REPLIES, "status": StatusReply[WireRecord], "list": ListReply[WireRecord], "wait": WaitReply[WireRecord],
}
"""The same declarations as a client decodes them: the records of status/list/wait as maps."""


def decode_reply(op: str, reply: dict[str, Any]) -> Reply:
    """A client's typed view of an ``ok`` reply map of ``op``, checked against its declaration.
    Raises ``msgspec.ValidationError`` for a reply that does not match it."""
    return msgspec.convert(reply, CLIENT_REPLIES[op])

_encoder = msgspec.msgpack.Encoder()


def encode_reply(reply: Reply | ErrorReply) -> bytes:
    """Encode a reply (records spliced in as they are). Raises TypeError / OverflowError for
    values msgpack cannot represent."""
    return _encoder.encode(reply)


def error_reply(request_id: Any, code: str, message: str) -> bytes:
    return _encoder.encode(ErrorReply(rid=request_id, error=ErrorInfo(code, message)))
