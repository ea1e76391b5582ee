"""The asyncio client: :class:`AsyncClient` mirrors :class:`effectd.client.Client` with ``await``.

One ``AsyncClient`` serves any number of concurrent coroutines (many ``wait`` calls parked at
once, streams, submits) over a single control connection:

* **DEALER + rid correlation.** The control socket is a DEALER, not a REQ: every request goes out
  as ``[b"", msgpack]`` with a unique ``rid``, and one reader task hands each reply to the future
  registered under its ``rid``. A reply nobody waits for any more (its caller was cancelled, or
  it answers an earlier copy of a resent request) is discarded.
* **Lazy Pirate, per request.** Each request waits for its reply for ``timeout`` seconds (for
  ``wait``: the server-side wait plus ``timeout``). When that passes, the DEALER is closed
  (linger 0) and reopened, and *every* request still in flight is sent again with the same
  ``rid`` (the old socket's replies would go to an identity that no longer exists). Mutating
  requests carry an idempotency ``request_key`` where the protocol has one, so a resend
  never submits twice. After ``1 + retries`` attempts the call raises
  :class:`~effectd.ipc.errors.DaemonUnavailable`.
* **Cancellation-safe.** Cancelling a coroutine awaiting any operation (``wait`` included)
  only forgets its future; the client stays usable. A cancelled ``wait`` stays parked in the
  daemon until its server-side timeout (at most :data:`WAIT_SLICE` seconds for waits without a
  timeout) and its late reply is dropped. A stream's SUB socket is closed in ``finally``.
* **One core.** Every operation (request building, reply decoding, wait slicing, busy backoff,
  the exact-stream algorithm of ``follow.py``: subscribe, replay the store, go live, fill gaps
  from the store, drop duplicates) is written once, without I/O, in ``core.py``; this module
  only performs its steps with asyncio sockets, as ``sync.py`` does with blocking ones.

A client is bound to the event loop it is first used in. Use it as ``async with AsyncClient()
as c:`` or call :meth:`AsyncClient.aclose`.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import zmq
import zmq.asyncio

from effectd.client import autostart, core
from effectd.client.core import DEFAULT_RETRIES, DEFAULT_TIMEOUT, PROBE_TIMEOUT, WAIT_SLICE, Machine, Ops, Step
from effectd.client.follow import Follower, follow
from effectd.client.records import Chunk, EffectRecord, OutputSlice
from effectd.client.spec import python_spec, shell_spec, sleep_spec
from effectd.client.transport import check_reply
from effectd.ipc import codec
from effectd.ipc.endpoints import Endpoints, check_topic, runtime_dir, state_dir, stream_hwm
from effectd.ipc.errors import DaemonUnavailable, EffectdError, TooLarge
from effectd.ipc.schema import build_request

log = logging.getLogger("effectd.client.aio")

__all__ = ["PROBE_TIMEOUT", "WAIT_SLICE", "AsyncClient"]

T = TypeVar("T")


@dataclass
class _InFlight:
    """A request waiting for its reply: the encoded message (for resends) and its future."""

    data: bytes
    future: asyncio.Future[dict[str, Any]]
    sent_at: float = 0.0


class AsyncClient:
    """An asyncio connection to one effectd daemon (see the module docstring for the design).

    >>> async with AsyncClient() as c:
    ...     ids = [await c.submit_shell(f"sleep {n}") for n in (3, 1, 2)]
    ...     async for rec in c.as_completed(ids):
    ...         print(rec.id, rec.state.value)
    """

    def __init__(self, runtime: str | os.PathLike[str] | None = None, *,
                 state: str | os.PathLike[str] | None = None, autostart: bool = True,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 start_timeout: float = autostart.DEFAULT_START_TIMEOUT) -> None:
        self.runtime = Path(runtime) if runtime is not None else runtime_dir()
        self.state = Path(state) if state is not None else state_dir()
        self.endpoints = Endpoints.for_runtime(self.runtime)
        self.timeout = timeout
        self.retries = retries
        self.ctx: zmq.asyncio.Context = zmq.asyncio.Context()
        self._autostart = autostart
        self._start_timeout = start_timeout
        self._connected = False
        self._connect_lock: asyncio.Lock | None = None
        self._closed = False
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._subs: set[zmq.asyncio.Socket] = set()
        self._counter = itertools.count(1)
        self._prefix = f"{os.getpid()}-{os.urandom(3).hex()}a-"
        self.reconnects = 0
        """How many times the control socket was reopened (Lazy Pirate), for diagnostics."""

    # ---- plumbing -------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the sockets; calls still waiting raise DaemonUnavailable. Idempotent."""
        self.close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` (no I/O is awaited: sockets close with linger 0)."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        for entry in self._inflight.values():
            if not entry.future.done():
                entry.future.set_exception(DaemonUnavailable("the client was closed"))
        self._inflight.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        for sub in list(self._subs):
            sub.close(linger=0)
        self._subs.clear()
        self.ctx.destroy(linger=0)

    def _next_rid(self) -> str:
        return f"{self._prefix}{next(self._counter)}"

    def _socket(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise DaemonUnavailable("the client is closed")
        if self._sock is None:
            autostart.check_runtime_dir(self.endpoints.runtime)  # at every (re)connect
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # No IMMEDIATE: requests queue on the pipe until the daemon's socket exists, so a
            # send never blocks; a daemon that never answers is the reply timeout's business.
            sock.connect(self.endpoints.control)
            self._sock = sock
            self._reader = asyncio.get_running_loop().create_task(
                self._read_replies(sock), name="effectd-aio-replies")
        return self._sock

    async def _read_replies(self, sock: zmq.asyncio.Socket) -> None:
        """Dispatch every reply on ``sock`` to the future of its rid; drop the rest."""
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                return  # the socket was closed under us (reconnect or close)
            body = frames[-1]
            try:
                reply = codec.unpack(body, max_bytes=codec.MAX_WORKER_MESSAGE_BYTES)
            except TooLarge as exc:
                # Already in memory: find whose it is, so that caller fails now, not by timeout.
                with contextlib.suppress(EffectdError):
                    self._deliver(codec.unpack(body, max_bytes=len(body)), exc)
                continue
            except EffectdError as exc:
                log.warning("dropping an undecodable reply: %s", exc)
                continue
            except Exception:  # never let one reply end the reader: every caller would go deaf
                log.exception("dropping a reply that could not be handled")
                continue
            self._deliver(reply, None)

    def _deliver(self, reply: Any, error: EffectdError | None) -> None:
        rid = reply.get("rid") if isinstance(reply, dict) else None
        entry = self._inflight.get(rid) if isinstance(rid, str) else None
        if entry is None or entry.future.done():
            return  # late: its caller was cancelled, timed out, or already answered
        if error is not None:
            entry.future.set_exception(error)
        else:
            entry.future.set_result(reply)

    def _send(self, entry: _InFlight) -> None:
        """Queue ``entry`` on the current socket without awaiting (never blocks the caller)."""
        entry.sent_at = time.monotonic()
        fut = asyncio.ensure_future(self._socket().send_multipart([b"", entry.data]))
        fut.add_done_callback(_ignore_send_outcome)

    def _reconnect(self) -> None:
        """Lazy Pirate: a fresh DEALER, and every request in flight sent again on it."""
        self.reconnects += 1
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        for entry in list(self._inflight.values()):
            if not entry.future.done():
                self._send(entry)

    async def _roundtrip(self, msg: dict[str, Any], *, timeout: float | None = None,
                         retries: int | None = None) -> dict[str, Any]:
        """Send ``msg`` and return its ``ok`` reply, raising the mapped exception on errors.

        ``timeout`` bounds each attempt (measured from the attempt's send); the call as a whole
        takes at most ``(1 + retries) * timeout``."""
        rid = msg["rid"]
        wait = self.timeout if timeout is None else timeout
        attempts_left = self.retries if retries is None else retries
        loop = asyncio.get_running_loop()
        entry = _InFlight(codec.pack(msg), loop.create_future())
        give_up = time.monotonic() + wait * (1 + attempts_left)
        self._inflight[rid] = entry
        try:
            self._send(entry)
            while True:
                now = time.monotonic()
                remaining = min(entry.sent_at + wait, give_up) - now
                if remaining > 0:
                    # asyncio.wait never cancels the future: a timeout here loses nothing.
                    await asyncio.wait((entry.future,), timeout=remaining)
                    if entry.future.done():
                        break
                    continue  # maybe resent meanwhile by another caller's reconnect
                if attempts_left <= 0 or now >= give_up:
                    raise DaemonUnavailable(
                        f"no reply from effectd at {self.endpoints.control} within {wait:.1f}s "
                        f"({1 + (self.retries if retries is None else retries)} attempt(s))")
                attempts_left -= 1
                log.debug("no reply to %s %s within %.1fs: reconnecting", msg.get("op"), rid, wait)
                self._reconnect()
            reply = entry.future.result()
        finally:
            self._inflight.pop(rid, None)
            if not entry.future.done():
                entry.future.cancel()
        return check_reply(reply)

    def _use(self, runtime: Path) -> None:
        """Talk to the daemon whose runtime dir is ``runtime`` (``self.runtime`` stays as asked)."""
        if runtime != self.endpoints.runtime:
            self.endpoints = Endpoints.for_runtime(runtime)
            if self._sock is not None:
                self._reconnect()

    async def _probe(self, runtime: Path) -> bool:
        self._use(runtime)
        return await self._run(core.probe())

    async def connect(self) -> None:
        """Make sure a daemon answers (starting one if allowed; the start runs in a thread)."""
        if self._connected:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return
            found = autostart.locate(self.runtime, self.state, autostart=self._autostart)
            if found is None:
                loop = asyncio.get_running_loop()

                def probe(runtime: Path) -> bool:  # runs in the ensure_daemon thread
                    if self._closed or loop.is_closed():
                        raise DaemonUnavailable("the client was closed while starting the daemon")
                    fut = asyncio.run_coroutine_threadsafe(self._probe(runtime), loop)
                    try:
                        return fut.result(timeout=PROBE_TIMEOUT * 4)
                    except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                        fut.cancel()
                        return False

                found = await asyncio.to_thread(autostart.ensure_daemon, self.runtime, self.state, probe,
                                                self._start_timeout)
            self._use(found)
            self._connected = True

    async def request(self, op: str, fields: Mapping[str, Any], *,
                      reply_timeout: float | None = None) -> dict[str, Any]:
        """Send one request built from a mapping of its fields; returns the ``ok`` reply map.

        ``reply_timeout`` bounds each attempt (Lazy Pirate). Fields are validated by
        :func:`~effectd.ipc.schema.build_request` before anything is sent."""
        await self.connect()
        msg = build_request(op, self._next_rid(), **fields)
        try:
            return await self._roundtrip(msg, timeout=reply_timeout)
        except DaemonUnavailable as exc:
            if self._closed or not self._autostart or not autostart.went_away(exc, self.runtime, self.state):
                raise
            self._connected = False  # the daemon went away: start another and retry once
            await self.connect()
            return await self._roundtrip(msg, timeout=reply_timeout)

    async def call(self, op: str, *, reply_timeout: float | None = None,
                   **args: Any) -> dict[str, Any]:
        """Send one request; ``reply_timeout`` bounds each attempt (Lazy Pirate)."""
        return await self.request(op, args, reply_timeout=reply_timeout)

    # ---- driving the core -----------------------------------------------------------------

    async def _steps(self, m: Machine[Any], sub: _Subscription | None = None) -> AsyncGenerator[Any, None]:
        """Perform the steps of one core operation; yield what it emits."""
        try:
            while (step := m.next()) is not None:
                if isinstance(step, core.Emit):
                    yield step.item
                    continue
                with m.outcome():
                    m.give(await self._perform(step, sub))
        finally:
            m.close()

    async def _perform(self, step: Step, sub: _Subscription | None) -> Any:
        if isinstance(step, core.Call):
            timeout = step.attempt_timeout(self.timeout)
            if step.direct:
                msg = build_request(step.op, self._next_rid(), **step.args)
                return await self._roundtrip(msg, timeout=timeout, retries=step.retries)
            return await self.request(step.op, step.args, reply_timeout=timeout)
        if isinstance(step, core.Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if sub is None:
            raise TypeError(f"{step!r} outside a stream")
        if isinstance(step, core.Poll):
            return await sub.poll(step.timeout)
        return sub.recv()

    async def _run(self, ops: Ops[T]) -> T:
        m = Machine(ops)
        async for item in self._steps(m):
            raise TypeError(f"a request operation emitted {item!r}")
        return m.value

    # ---- operations -----------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return await self._run(core.hello(f"effectd.client.aio/{os.getpid()}"))

    async def submit(self, effect: Mapping[str, Any], *, request_key: str | None = None) -> str:
        """Submit an effect specification; returns its id once the daemon journaled it."""
        return await self._run(core.submit(effect, request_key))

    async def submit_many(self, effects: Sequence[Mapping[str, Any]], *,
                          request_key: str | None = None) -> builtins.list[str]:
        """Submit several effects in one atomic commit."""
        return await self._run(core.submit_many(effects, request_key))

    async def submit_shell(self, command: str | Sequence[str], **options: Any) -> str:
        """Run a shell command (string: via /bin/sh -c; sequence: argv). See :func:`shell_spec`."""
        return await self.submit(shell_spec(command, **options))

    async def submit_python(self, target: str, args: Sequence[Any] = (),
                            kwargs: Mapping[str, Any] | None = None, **options: Any) -> str:
        """Call ``"package.module:function"`` in a worker. See :func:`python_spec`."""
        return await self.submit(python_spec(target, args, kwargs, **options))

    async def submit_sleep(self, seconds: float, **options: Any) -> str:
        return await self.submit(sleep_spec(seconds, **options))

    async def status(self, effect_id: str) -> EffectRecord:
        return await self._run(core.status(effect_id))

    async def status_many(self, ids: Sequence[str]) -> builtins.list[EffectRecord]:
        return await self._run(core.status_many(ids))

    async def list(self, *, states: Sequence[str] | None = None,
                   labels: Mapping[str, str] | None = None, name: str | None = None,
                   limit: int = 100, before: str | None = None) -> builtins.list[EffectRecord]:
        return await self._run(core.list_effects(states, labels, name, limit, before))

    async def wait(self, effect_id: str, timeout: float | None = None) -> EffectRecord:
        """Until the effect is final (or ``timeout`` passes); returns its record."""
        return (await self.wait_many([effect_id], timeout=timeout))[0]

    async def wait_many(self, ids: Sequence[str], timeout: float | None = None,
                        return_when: str = "all") -> builtins.list[EffectRecord]:
        """Wait for all (``return_when="all"``) or the first (``"first"``) of ``ids``."""
        return await self._run(core.wait_many(ids, timeout, return_when))

    def as_completed(self, ids: Sequence[str],
                     timeout: float | None = None) -> AsyncGenerator[EffectRecord, None]:
        """Yield effects as they become final, in completion order (parked waits, no polling).

        Raises TimeoutError if some are not final within ``timeout`` seconds."""
        return self._steps(Machine(core.as_completed(ids, timeout)))

    async def result(self, effect_id: str) -> EffectRecord:
        """The record of a final effect (raises InvalidState while it runs)."""
        return await self._run(core.result(effect_id))

    async def cancel(self, *ids: str, reason: str | None = None) -> builtins.list[dict[str, Any]]:
        return await self._run(core.cancel(ids, reason))

    async def read_output(self, effect_id: str, stream: str = "stdout", offset: int = 0,
                          max_bytes: int | None = None) -> OutputSlice:
        """Stored bytes from ``offset`` (possibly fewer than ``max_bytes``); a ``busy`` answer
        (the daemon's read budget is in use by other readers) is retried after a short backoff."""
        return await self._run(core.read_output(effect_id, stream, offset, max_bytes))

    async def output(self, effect_id: str, stream: str = "stdout") -> bytes:
        """Everything stored so far for one stream."""
        return await self._run(core.output(effect_id, stream))

    async def set_group_limit(self, name: str, parallel: int | None) -> None:
        """Limit how many effects of ``group`` run at once (None: no limit). Persisted."""
        await self._run(core.set_group_limit(name, parallel))

    async def groups(self) -> builtins.list[dict[str, Any]]:
        return await self._run(core.groups())

    async def gc(self, *, retain_days: float | None = None, retain_count: int | None = None,
                 retain_bytes: int | None = None) -> dict[str, Any]:
        """Delete old final effects and their output now; returns what was freed."""
        return await self._run(core.gc(retain_days, retain_count, retain_bytes))

    async def shutdown(self, drain: bool = True) -> None:
        await self._run(core.shutdown(drain))

    # ---- streams --------------------------------------------------------------------------

    async def stream(self, effect_id: str, from_offset: int = 0,
                     streams: Sequence[str] = ("stdout", "stderr")) -> AsyncGenerator[Chunk, None]:
        """Every byte the effect writes, in order, from ``from_offset``; ends when it is final.

        Subscribes first, replays what is stored, then continues live; gaps (dropped PUB
        messages) are filled from the store, duplicates dropped. Exact by construction. The
        SUB socket is closed when the iteration ends, fails or is cancelled (use
        ``contextlib.aclosing`` when breaking out early to close it at once)."""
        f = Follower.start(streams, from_offset)
        topic = check_topic(effect_id.encode())
        await self.connect()
        if self._closed:
            raise DaemonUnavailable("the client is closed")
        sub = self.ctx.socket(zmq.SUB)
        self._subs.add(sub)
        subscription = _Subscription(sub)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, stream_hwm())
            autostart.check_runtime_dir(self.endpoints.runtime)
            sub.connect(self.endpoints.stream)
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            async with contextlib.aclosing(self._steps(Machine(follow(effect_id, f)), subscription)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            subscription.close()
            self._subs.discard(sub)
            sub.close(linger=0)

    async def values(self, effect_id: str) -> AsyncGenerator[Any, None]:
        """The values a python generator effect yields, decoded, live and in order."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        async with contextlib.aclosing(self.stream(effect_id, streams=("value",))) as chunks:
            async for chunk in chunks:
                unpacker.feed(chunk.data)
                for value in unpacker:
                    yield value


class _Subscription:
    """A stream's SUB socket for the core's Poll/Recv steps. One receive is kept pending across
    polls: asyncio.wait never cancels it, so no frame is ever taken off the socket and lost."""

    def __init__(self, sub: zmq.asyncio.Socket) -> None:
        self.sub = sub
        self._recv: asyncio.Future[builtins.list[bytes]] | None = None

    async def poll(self, timeout: float) -> bool:
        if self._recv is None:
            self._recv = asyncio.ensure_future(self.sub.recv_multipart())
        await asyncio.wait((self._recv,), timeout=timeout)
        return self._recv.done()

    def recv(self) -> builtins.list[bytes]:
        recv, self._recv = self._recv, None
        if recv is None or recv.cancelled():  # the client was closed under us
            raise DaemonUnavailable("the client was closed during the stream")
        return recv.result()

    def close(self) -> None:
        if self._recv is not None and not self._recv.done():
            self._recv.cancel()


def _ignore_send_outcome(fut: asyncio.Future[Any]) -> None:
    # A send that failed or was cancelled (socket closed by a reconnect) is covered by the
    # reply timeout and the resend; retrieve the exception so asyncio does not log it.
    if not fut.cancelled():
        with contextlib.suppress(Exception):
            fut.exception()
