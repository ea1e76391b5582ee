"""Typed messages: worker messages and stream headers (records and replies: records.py).

Each message is one ``msgspec.Struct``; its field order is the key order on the wire, so the
encoded bytes are those the dict-built messages had (docs/protocol.md and the Node client stay
valid). Worker messages are tagged unions on ``t``: one decode validates types and limits and
yields the right class, with no second hand-written check. tests/test_protocol_doc.py checks
protocol.md's tables against these declarations.

Control *requests* keep their field tables in schema.py: their error messages
(``effect.timeout: must be >= 0.001``) are part of the contract.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from effectd.ipc.codec import MAX_WORKER_MESSAGE_BYTES
from effectd.ipc.errors import BadRequest, TooLarge, UnknownOp

EffectId = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")]
Attempt = Annotated[int, msgspec.Meta(ge=1)]
FinalState = Literal["succeeded", "failed", "cancelled", "timed_out", "lost"]
EventType = Literal["started", "finished", "progress", "subscribed"]


# --------------------------------------------------------------------------------------------
# Stream headers (protocol.md §8.2, §8.3)


class ChunkHeader(msgspec.Struct, kw_only=True):
    stream: Literal["stdout", "stderr", "value"]
    offset: Annotated[int, msgspec.Meta(ge=0)]
    attempt: int | None = None


class EventHeader(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="stream", tag="event"):
    """Fields with no value are omitted on the wire; ``stream`` (always ``"event"``) is the tag,
    so it is always sent."""

    event: EventType
    state: str | None = None
    attempt: int | None = None
    sizes: dict[str, int] | None = None
    fraction: float | None = None
    message: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    time: float | None = None


# --------------------------------------------------------------------------------------------
# Worker <-> daemon messages (protocol.md §12): one msgpack map each, key "t" = type


class WorkerMessage(msgspec.Struct, tag_field="t", kw_only=True):
    """Worker -> daemon."""


class RunningReport(msgspec.Struct, kw_only=True):
    """An attempt a worker still runs (in ``ready``: re-adoption)."""

    id: EffectId
    attempt: Attempt
    pid: int | None = None
    create_time: float | None = None
    sizes: dict[str, int] | None = None
    started_at: float | None = None


class Ready(WorkerMessage, tag="ready"):
    proto: int
    worker: Annotated[str, msgspec.Meta(max_length=64)]
    pid: int
    slots: Annotated[int, msgspec.Meta(ge=1)]
    # Checked one by one (check_report): one bad report must not void the rest.
    running: list[dict[str, Any]] | None = None
    finished: list[dict[str, Any]] | None = None
    effects_done: int = 0


class Heartbeat(WorkerMessage, tag="hb"):
    effects_done: int | None = None
    rss: int | None = None


class Started(WorkerMessage, tag="started"):
    id: EffectId
    attempt: Attempt
    pid: int | None = None
    create_time: float | None = None
    started_at: float | None = None


class Finished(WorkerMessage, tag="finished"):
    """A completion report; kept and re-sent by the worker until acknowledged."""

    id: EffectId
    attempt: Attempt
    state: FinalState
    reason: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    exit_code: int | None = None
    signal: int | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    sizes: dict[str, int] | None = None
    truncated: dict[str, int] | None = None
    leaked_processes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    finished_at: float | None = None
    started_at: float | None = None


class Progress(WorkerMessage, tag="progress"):
    id: EffectId
    attempt: Attempt
    fraction: float | None = None
    message: Annotated[str, msgspec.Meta(max_length=4096)] | None = None


class Bye(WorkerMessage, tag="bye"):
    reason: str | None = None


class DaemonMessage(msgspec.Struct, tag_field="t", kw_only=True):
    """Daemon -> worker (MAC'd, see auth.py)."""


class Assign(DaemonMessage, tag="assign"):
    id: EffectId
    attempt: int
    spec: dict[str, Any]


class Cancel(DaemonMessage, tag="cancel"):
    id: EffectId
    reason: str | None = None


class Ack(DaemonMessage, tag="ack"):
    id: EffectId
    attempt: int


class DaemonHeartbeat(DaemonMessage, tag="hb"):
    pass


class Welcome(DaemonMessage, tag="welcome"):
    instance: str | None = None


class Reset(DaemonMessage, tag="reset"):
    pass


class Stop(DaemonMessage, tag="stop"):
    reason: str | None = None


WorkerToDaemon = Ready | Heartbeat | Started | Finished | Progress | Bye
DaemonToWorker = Assign | Cancel | Ack | DaemonHeartbeat | Welcome | Reset | Stop

WORKER_MESSAGES: tuple[type[WorkerMessage], ...] = (Ready, Heartbeat, Started, Finished, Progress, Bye)
DAEMON_MESSAGES: tuple[type[DaemonMessage], ...] = (Assign, Cancel, Ack, DaemonHeartbeat, Welcome, Reset, Stop)


def _refuse_ext(code: int, data: memoryview) -> Any:
    raise BadRequest(f"msgpack ext type {code} is not accepted")


_encoder = msgspec.msgpack.Encoder()
_worker_decoder = msgspec.msgpack.Decoder(WorkerToDaemon, ext_hook=_refuse_ext)
_daemon_decoder = msgspec.msgpack.Decoder(DaemonToWorker, ext_hook=_refuse_ext)


def encode(msg: msgspec.Struct) -> bytes:
    """Encode one typed message (worker message, header, record)."""
    return _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder[Any], data: bytes | memoryview, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise TooLarge(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        if "Invalid value" in str(exc) and "$.t" in str(exc):
            raise UnknownOp(f"unknown worker message type: {exc}") from exc
        raise BadRequest(f"bad worker message: {exc}") from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadRequest(f"not a valid msgpack message: {exc}") from exc


def decode_worker_message(data: bytes | memoryview, max_bytes: int = MAX_WORKER_MESSAGE_BYTES) -> WorkerToDaemon:
    """A worker -> daemon message, typed and checked; raises BadRequest / UnknownOp / TooLarge."""
    msg: WorkerToDaemon = _decode(_worker_decoder, data, max_bytes)
    return msg


def decode_daemon_message(data: bytes | memoryview, max_bytes: int = MAX_WORKER_MESSAGE_BYTES) -> DaemonToWorker:
    """A daemon -> worker message, typed and checked; raises BadRequest / UnknownOp / TooLarge."""
    msg: DaemonToWorker = _decode(_daemon_decoder, data, max_bytes)
    return msg


_chunk_decoder = msgspec.msgpack.Decoder(ChunkHeader)
_event_decoder = msgspec.msgpack.Decoder(EventHeader)


def decode_stream_header(data: bytes | memoryview) -> ChunkHeader | EventHeader | None:
    """A stream message's header (frame 1), or None for anything a client must ignore: a
    malformed header, an unknown event type or stream (protocol.md §4, §8.1)."""
    for decoder in (_chunk_decoder, _event_decoder):  # chunks are the common case
        try:
            header: ChunkHeader | EventHeader = decoder.decode(data)
            return header
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
    return None


def check_report(report: Any, cls: type[Finished] | type[RunningReport]) -> Any:
    """One report of a ``ready`` (or a run's own report) as ``cls``; raises BadRequest."""
    if not isinstance(report, dict):
        raise BadRequest("report must be a map")
    try:
        return msgspec.convert({k: v for k, v in report.items() if k != "t"}, cls)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"bad report: {exc}") from exc
