"""The client core, without I/O: every operation of ``Client`` and ``AsyncClient``, written once.

An operation is a generator of *steps*. It yields a :class:`Call` (one request: the driver sends
it and sends back the ``ok`` reply map, or throws the mapped exception into the generator), a
:class:`Sleep`, and in streams :class:`Poll`, :class:`Recv` and :class:`Emit`; its return value
is the operation's result. :class:`Machine` runs one operation for a driver. The sync client
(``sync.py``) and the asyncio client (``aio.py``) are thin drivers that perform the steps with
blocking or asyncio sockets - so request building, reply decoding, the wait slicing, the busy
backoff, ``as_completed`` and the stream/gap-fill algorithm (``follow.py``) exist once, and can
be tested by feeding replies to a generator, without sockets.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import random
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from effectd.client.records import EffectRecord, OutputSlice
from effectd.ipc import records as r
from effectd.ipc import request_args as ra
from effectd.ipc.errors import Busy, DaemonUnavailable, EffectdError, UnsafeDirectory
from effectd.ipc.schema import OP_OF_ARGS, EffectState

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
WAIT_SLICE = 30.0
"""A wait without timeout is a loop of server-side waits this long (detects a dead daemon)."""
PROBE_TIMEOUT = 0.5
"""Per-attempt timeout of the ``hello`` that checks whether a (starting) daemon answers."""
BATCH_SECONDS_PER_EFFECT = 0.001
"""Extra reply time per effect of a ``submit_many``: the daemon takes a big batch in over several
loop turns and answers once all of it is durable (measured: ~0.6 ms per effect with 64 labels
on a loaded 2-core machine)."""
BUSY_GIVE_UP = 60.0
"""Seconds a ``read_output`` answered ``busy`` is retried before the error is raised (the daemon
frees its read budget within 2 s even if the readers holding it vanished)."""


# ---- steps --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """Send one request; the driver answers with the ``ok`` reply map or throws its exception."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    extra_time: float = 0.0
    """Added to the client's per-attempt reply timeout (a server-side wait, a big batch)."""
    reply_timeout: float | None = None
    """Per-attempt reply timeout instead of the client's (then ``extra_time`` is not added)."""
    retries: int | None = None
    """Resends after a timeout instead of the client's; only with ``direct``."""
    direct: bool = False
    """Straight to the current endpoint: no connect, no autostart (the probe of a starting daemon)."""

    def attempt_timeout(self, client_timeout: float) -> float:
        return self.reply_timeout if self.reply_timeout is not None else client_timeout + self.extra_time


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Poll:
    """Wait up to ``timeout`` seconds for a stream message; answered True if one is ready."""

    timeout: float


@dataclass(frozen=True)
class Recv:
    """Take the stream message a :class:`Poll` found ready; answered with its frames."""


@dataclass(frozen=True)
class Emit:
    """Hand ``item`` to the caller (a stream chunk, a completed record); answered None."""

    item: Any


Step = Call | Sleep | Poll | Recv | Emit
Ops = Generator[Step, Any, T]
"""An operation: yields steps, is sent each step's outcome, returns its result."""


class Machine(Generic[T]):
    """Runs one operation for a driver: :meth:`next` gives the step to perform (None once the
    operation is over, then :attr:`value` is its result); the step's outcome is handed back
    with :meth:`give`, or - raised inside :meth:`outcome` - thrown into the operation."""

    def __init__(self, ops: Ops[T]) -> None:
        self._ops = ops
        self._answer: Any = None
        self._error: Exception | None = None
        self._value: list[T] = []

    def next(self) -> Step | None:
        answer, error = self._answer, self._error
        self._answer, self._error = None, None
        try:
            return self._ops.throw(error) if error is not None else self._ops.send(answer)
        except StopIteration as stop:
            self._value.append(stop.value)
            return None

    def give(self, answer: Any) -> None:
        self._answer = answer

    @contextlib.contextmanager
    def outcome(self) -> Iterator[None]:
        """Around performing a step: an exception goes to the operation, which may handle it
        (a busy read is retried) or not (then :meth:`next` raises it). Cancellation is not an
        Exception and goes straight up."""
        try:
            yield
        except Exception as exc:
            self._error = exc

    @property
    def value(self) -> T:
        return self._value[0]

    def close(self) -> None:
        self._ops.close()


def call(op: str, args: Mapping[str, Any] | None = None, *, extra_time: float = 0.0) -> Ops[dict[str, Any]]:
    reply: dict[str, Any] = yield Call(op, dict(args or {}), extra_time=extra_time)
    return reply


def request_map(args: ra.Args, *, extra_time: float = 0.0) -> Ops[dict[str, Any]]:
    """One request built from its op's declared arguments struct (ipc/request_args.py), so a
    misspelt or mistyped field is a type error here, not a ``bad_request`` from the daemon; its
    reply is checked against the op's declared reply (ipc/records.py) and returned as the map."""
    op = OP_OF_ARGS[type(args)]
    reply = yield from call(op, ra.wire_args(args), extra_time=extra_time)
    checked(op, reply)
    return reply


def request(args: ra.Args, *, extra_time: float = 0.0) -> Ops[r.Reply]:
    """As :func:`request_map`, the reply decoded into its declared type."""
    op = OP_OF_ARGS[type(args)]
    return checked(op, (yield from call(op, ra.wire_args(args), extra_time=extra_time)))


def checked(op: str, reply: dict[str, Any]) -> r.Reply:
    """The reply of ``op`` as its declared type; a reply that does not match the declaration
    (a daemon speaking another protocol) is an error, never a KeyError later."""
    try:
        return r.decode_reply(op, reply)
    except msgspec.ValidationError as exc:
        raise EffectdError(f"the daemon's {op!r} reply does not match the protocol: {exc}") from None


def records(effects: Sequence[Mapping[str, Any]]) -> builtins.list[EffectRecord]:
    return [EffectRecord.from_wire(rec) for rec in effects]


def new_request_key() -> str:
    return f"{os.getpid()}-{os.urandom(8).hex()}"


# ---- operations ---------------------------------------------------------------------------

def probe() -> Ops[bool]:
    """Whether a daemon answers at the current endpoint (an unsafe runtime dir still raises)."""
    try:
        yield Call("hello", reply_timeout=PROBE_TIMEOUT, retries=0, direct=True)
        return True
    except UnsafeDirectory:
        raise
    except DaemonUnavailable:
        return False


def hello(client: str) -> Ops[dict[str, Any]]:
    return (yield from request_map(ra.HelloArgs(client=client)))


def submit(effect: Mapping[str, Any], request_key: str | None) -> Ops[str]:
    reply = yield from request(ra.SubmitArgs(effect=dict(effect), request_key=request_key or new_request_key()))
    assert isinstance(reply, r.SubmitReply)
    return reply.id


def submit_many(effects: Sequence[Mapping[str, Any]], request_key: str | None) -> Ops[builtins.list[str]]:
    reply = yield from request(ra.SubmitManyArgs(effects=[dict(e) for e in effects],
                                                 request_key=request_key or new_request_key()),
                               extra_time=len(effects) * BATCH_SECONDS_PER_EFFECT)
    assert isinstance(reply, r.SubmitManyReply)
    return reply.ids


def status_many(ids: Sequence[str]) -> Ops[builtins.list[EffectRecord]]:
    reply = yield from request(ra.StatusArgs(ids=list(ids)))
    assert isinstance(reply, r.StatusReply)
    return records(reply.effects)


def status(effect_id: str) -> Ops[EffectRecord]:
    return (yield from status_many([effect_id]))[0]


def list_effects(states: Sequence[str] | None, labels: Mapping[str, str] | None, name: str | None,
                 limit: int, before: str | None) -> Ops[builtins.list[EffectRecord]]:
    out: builtins.list[EffectRecord] = []
    while True:  # a page the daemon cut at its reply limit ("truncated") continues from its last id
        reply = yield from request(ra.ListArgs(states=list(states) if states else None,
                                               labels=dict(labels) if labels else None, name=name,
                                               limit=limit - len(out), before=before))
        assert isinstance(reply, r.ListReply)
        out += records(reply.effects)
        if not reply.truncated or not reply.effects or len(out) >= limit:
            return out
        before = out[-1].id


def wait(ids: builtins.list[str], timeout: float | None,
         first: bool) -> Ops[tuple[builtins.list[EffectRecord], bool]]:
    """Server-side waits of at most WAIT_SLICE seconds until ``timeout``: (records, timed out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = WAIT_SLICE if deadline is None else max(0.0, min(WAIT_SLICE, deadline - time.monotonic()))
        reply = yield from request(ra.WaitArgs(ids=ids, timeout=left, return_when="first" if first else "all"),
                                   extra_time=left)
        assert isinstance(reply, r.WaitReply)
        if not reply.timed_out or (deadline is not None and time.monotonic() >= deadline):
            return records(reply.effects), reply.timed_out


def wait_many(ids: Sequence[str], timeout: float | None, return_when: str) -> Ops[builtins.list[EffectRecord]]:
    if return_when not in ("all", "first"):
        raise ValueError(f"return_when must be 'all' or 'first', not {return_when!r}")
    found, _ = yield from wait(list(ids), timeout, return_when == "first")
    return found


def as_completed(ids: Sequence[str], timeout: float | None) -> Ops[None]:
    """Emits records as they become final, in completion order: each wait is parked in the
    daemon and answered at the first completion, so there is no polling."""
    pending = list(dict.fromkeys(ids))
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        found, timed_out = yield from wait(pending, left, first=True)
        done = sorted((rec for rec in found if rec.final), key=lambda rec: (rec.finished_at or 0, rec.id))
        if not done and timed_out:
            raise TimeoutError(f"{len(pending)} effect(s) not finished within {timeout}s")
        for rec in done:
            pending.remove(rec.id)
            yield Emit(rec)


def result(effect_id: str) -> Ops[EffectRecord]:
    reply = yield from request_map(ra.ResultArgs(id=effect_id))
    rec = yield from status(effect_id)
    return rec if rec.final else EffectRecord.from_wire({**rec.to_json(), **reply})


def cancel(ids: Sequence[str], reason: str | None) -> Ops[builtins.list[dict[str, Any]]]:
    return list((yield from request_map(ra.CancelArgs(ids=list(ids), reason=reason)))["effects"])


def busy_backoff() -> Iterator[float]:
    """Delays between retries of a ``read_output`` answered ``busy`` (protocol.md §5.9): 10 ms,
    doubling to 250 ms, with jitter so that many readers do not retry in step; ends after
    BUSY_GIVE_UP seconds."""
    delay = 0.01
    spent = 0.0
    while spent < BUSY_GIVE_UP:
        pause = delay * random.uniform(0.5, 1.0)
        spent += pause
        yield pause
        delay = min(delay * 2, 0.25)


def read_output(effect_id: str, stream: str, offset: int, max_bytes: int | None) -> Ops[OutputSlice]:
    """Stored bytes from ``offset``; a ``busy`` answer (the daemon's read budget is in use by
    other readers) is retried after a short backoff."""
    delays = busy_backoff()
    args = ra.wire_args(ra.ReadOutputArgs(id=effect_id, stream=stream, offset=offset,
                                          max_bytes=ra.DEFAULT_READ_BYTES if max_bytes is None else max_bytes))
    args["max_bytes"] = max_bytes  # None: left out, the daemon's default applies (as it always did)
    while True:
        try:
            reply = checked("read_output", (yield from call(OP_OF_ARGS[ra.ReadOutputArgs], args)))
            break
        except Busy:
            delay = next(delays, None)
            if delay is None:
                raise
            yield Sleep(delay)
    assert isinstance(reply, r.ReadOutputReply)
    return OutputSlice(reply.id, reply.stream, reply.offset, reply.data, reply.next_offset, reply.size,
                       EffectState(reply.state), reply.eof)


def output(effect_id: str, stream: str) -> Ops[bytes]:
    parts = []
    offset = 0
    while True:
        piece = yield from read_output(effect_id, stream, offset, None)
        parts.append(piece.data)
        offset = piece.next_offset
        if not piece.data or offset >= piece.size:
            return b"".join(parts)


def set_group_limit(name: str, parallel: int | None) -> Ops[None]:
    yield from request(ra.GroupSetArgs(name=name, parallel=parallel))


def groups() -> Ops[builtins.list[dict[str, Any]]]:
    return list((yield from request_map(ra.GroupsArgs()))["groups"])


def gc(retain_days: float | None, retain_count: int | None, retain_bytes: int | None) -> Ops[dict[str, Any]]:
    reply = yield from request(ra.GcArgs(retain_days=retain_days, retain_count=retain_count,
                                         retain_bytes=retain_bytes))
    assert isinstance(reply, r.GcReply)
    return {"removed": reply.removed, "freed_bytes": reply.freed_bytes, "kept": reply.kept,
            "kept_bytes": reply.kept_bytes}


def shutdown(drain: bool) -> Ops[None]:
    yield from request(ra.ShutdownArgs(drain=drain))
