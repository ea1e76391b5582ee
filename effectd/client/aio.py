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
* **Exact streams.** :meth:`AsyncClient.stream` uses the same sans-I/O
  :class:`~effectd.client.follow.Follower` as the sync client: subscribe, replay the store, go
  live, fill gaps from the store, drop duplicates.

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
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from effectd.client import autostart
from effectd.client.follow import (
    FINISHED,
    IDLE_CHECK,
    SUBSCRIBED_WAIT,
    Follower,
    busy_backoff,
    parse_frame,
)
from effectd.client.records import Chunk, EffectRecord, OutputSlice
from effectd.client.spec import python_spec, shell_spec, sleep_spec
from effectd.client.sync import DEFAULT_RETRIES, DEFAULT_TIMEOUT, WAIT_SLICE
from effectd.client.transport import batch_reply_timeout
from effectd.ipc import codec
from effectd.ipc.endpoints import Endpoints, check_topic, runtime_dir, state_dir, stream_hwm
from effectd.ipc.errors import Busy, DaemonUnavailable, EffectdError, TooLarge, UnsafeDirectory, error_from_wire
from effectd.ipc.schema import EffectState, build_request

log = logging.getLogger("effectd.client.aio")

PROBE_TIMEOUT = 0.5


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
        self.last_follower: Follower | None = None
        """The follower of the most recently ended stream (gap/duplicate counters, for tests)."""

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
        if reply.get("ok"):
            return reply
        err = reply.get("error") or {}
        raise error_from_wire(str(err.get("code", "internal")), str(err.get("message", "")))

    def _use(self, runtime: Path) -> None:
        """Talk to the daemon whose runtime dir is ``runtime`` (``self.runtime`` stays as asked)."""
        if runtime != self.endpoints.runtime:
            self.endpoints = Endpoints.for_runtime(runtime)
            if self._sock is not None:
                self._reconnect()

    async def _probe(self, runtime: Path) -> bool:
        self._use(runtime)
        try:
            await self._roundtrip(build_request("hello", self._next_rid()), timeout=PROBE_TIMEOUT,
                                  retries=0)
            return True
        except UnsafeDirectory:
            raise
        except DaemonUnavailable:
            return False

    async def connect(self) -> None:
        """Make sure a daemon answers (starting one if allowed; the start runs in a thread)."""
        if self._connected:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return
            found = autostart.find_daemon(self.runtime, self.state)
            if found is None:
                if not self._autostart:
                    raise DaemonUnavailable(
                        f"effectd is not running for {self.runtime} (autostart disabled)")
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
            if (self._closed or not self._autostart or isinstance(exc, UnsafeDirectory)
                    or autostart.find_daemon(self.runtime, self.state) is not None):
                raise
            self._connected = False  # the daemon went away: start another and retry once
            await self.connect()
            return await self._roundtrip(msg, timeout=reply_timeout)

    async def call(self, op: str, *, reply_timeout: float | None = None,
                   **args: Any) -> dict[str, Any]:
        """Send one request; ``reply_timeout`` bounds each attempt (Lazy Pirate)."""
        return await self.request(op, args, reply_timeout=reply_timeout)

    # ---- operations -----------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return await self.call("hello", client=f"effectd.client.aio/{os.getpid()}")

    async def submit(self, effect: Mapping[str, Any], *, request_key: str | None = None) -> str:
        """Submit an effect specification; returns its id once the daemon journaled it."""
        key = request_key or f"{os.getpid()}-{os.urandom(8).hex()}"
        return str((await self.call("submit", effect=dict(effect), request_key=key))["id"])

    async def submit_many(self, effects: Sequence[Mapping[str, Any]], *,
                          request_key: str | None = None) -> builtins.list[str]:
        """Submit several effects in one atomic commit."""
        key = request_key or f"{os.getpid()}-{os.urandom(8).hex()}"
        reply = await self.call("submit_many", effects=[dict(e) for e in effects], request_key=key,
                                reply_timeout=batch_reply_timeout(self.timeout, len(effects)))
        return list(reply["ids"])

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
        return (await self.status_many([effect_id]))[0]

    async def status_many(self, ids: Sequence[str]) -> builtins.list[EffectRecord]:
        reply = await self.call("status", ids=list(ids))
        return [EffectRecord.from_wire(r) for r in reply["effects"]]

    async def list(self, *, states: Sequence[str] | None = None,
                   labels: Mapping[str, str] | None = None, name: str | None = None,
                   limit: int = 100, before: str | None = None) -> builtins.list[EffectRecord]:
        out: builtins.list[EffectRecord] = []
        while True:  # a page the daemon cut at its reply limit ("truncated") continues from its last id
            reply = await self.call("list", states=list(states) if states else None,
                                    labels=dict(labels) if labels else None, name=name,
                                    limit=limit - len(out), before=before)
            out += [EffectRecord.from_wire(r) for r in reply["effects"]]
            if not reply.get("truncated") or not reply["effects"] or len(out) >= limit:
                return out
            before = out[-1].id

    async def _wait(self, ids: builtins.list[str], timeout: float | None,
                    first: bool) -> tuple[builtins.list[EffectRecord], bool]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = (WAIT_SLICE if deadline is None
                    else max(0.0, min(WAIT_SLICE, deadline - time.monotonic())))
            reply = await self.call("wait", ids=ids, timeout=left,
                                    return_when="first" if first else "all",
                                    reply_timeout=left + self.timeout)
            records = [EffectRecord.from_wire(r) for r in reply["effects"]]
            if not reply["timed_out"] or (deadline is not None and time.monotonic() >= deadline):
                return records, bool(reply["timed_out"])

    async def wait(self, effect_id: str, timeout: float | None = None) -> EffectRecord:
        """Until the effect is final (or ``timeout`` passes); returns its record."""
        return (await self.wait_many([effect_id], timeout=timeout))[0]

    async def wait_many(self, ids: Sequence[str], timeout: float | None = None,
                        return_when: str = "all") -> builtins.list[EffectRecord]:
        """Wait for all (``return_when="all"``) or the first (``"first"``) of ``ids``."""
        if return_when not in ("all", "first"):
            raise ValueError(f"return_when must be 'all' or 'first', not {return_when!r}")
        records, _ = await self._wait(list(ids), timeout, return_when == "first")
        return records

    async def as_completed(self, ids: Sequence[str],
                           timeout: float | None = None) -> AsyncGenerator[EffectRecord, None]:
        """Yield effects as they become final, in completion order (parked waits, no polling).

        Raises TimeoutError if some are not final within ``timeout`` seconds."""
        pending = list(dict.fromkeys(ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            records, timed_out = await self._wait(pending, left, first=True)
            done = sorted((r for r in records if r.final), key=lambda r: (r.finished_at or 0, r.id))
            if not done and timed_out:
                raise TimeoutError(f"{len(pending)} effect(s) not finished within {timeout}s")
            for rec in done:
                pending.remove(rec.id)
                yield rec

    async def result(self, effect_id: str) -> EffectRecord:
        """The record of a final effect (raises InvalidState while it runs)."""
        reply = await self.call("result", id=effect_id)
        rec = await self.status(effect_id)
        return rec if rec.final else EffectRecord.from_wire({**rec.to_json(), **reply})

    async def cancel(self, *ids: str, reason: str | None = None) -> builtins.list[dict[str, Any]]:
        return list((await self.call("cancel", ids=list(ids), reason=reason))["effects"])

    async def read_output(self, effect_id: str, stream: str = "stdout", offset: int = 0,
                          max_bytes: int | None = None) -> OutputSlice:
        """Stored bytes from ``offset`` (possibly fewer than ``max_bytes``); a ``busy`` answer
        (the daemon's read budget is in use by other readers) is retried after a short backoff."""
        delays = busy_backoff()
        while True:
            try:
                r = await self.call("read_output", id=effect_id, stream=stream, offset=offset,
                                    max_bytes=max_bytes)
                break
            except Busy:
                delay = next(delays, None)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        return OutputSlice(r["id"], r["stream"], r["offset"], bytes(r["data"]), r["next_offset"],
                           r["size"], EffectState(r["state"]), bool(r["eof"]))

    async def output(self, effect_id: str, stream: str = "stdout") -> bytes:
        """Everything stored so far for one stream."""
        parts = []
        offset = 0
        while True:
            piece = await self.read_output(effect_id, stream, offset)
            parts.append(piece.data)
            offset = piece.next_offset
            if not piece.data or offset >= piece.size:
                return b"".join(parts)

    async def set_group_limit(self, name: str, parallel: int | None) -> None:
        """Limit how many effects of ``group`` run at once (None: no limit). Persisted."""
        await self.call("group_set", name=name, parallel=parallel)

    async def groups(self) -> builtins.list[dict[str, Any]]:
        return list((await self.call("groups"))["groups"])

    async def gc(self, *, retain_days: float | None = None, retain_count: int | None = None,
                 retain_bytes: int | None = None) -> dict[str, Any]:
        """Delete old final effects and their output now; returns what was freed."""
        reply = await self.call("gc", retain_days=retain_days, retain_count=retain_count,
                                retain_bytes=retain_bytes)
        return {k: reply[k] for k in ("removed", "freed_bytes", "kept", "kept_bytes")}

    async def shutdown(self, drain: bool = True) -> None:
        await self.call("shutdown", drain=drain)

    # ---- streams --------------------------------------------------------------------------

    async def _fill(self, effect_id: str, f: Follower, stream: str,
                    until: int | None) -> AsyncGenerator[Chunk, None]:
        """Read the store from f.expected[stream] up to ``until`` (None: to the current end)."""
        while (window := f.read_window(stream, until)) is not None:
            chunk, more = f.apply_read(stream, until, await self.read_output(effect_id, stream, *window))
            if chunk is not None:
                yield chunk
            if not more:
                return

    async def _final_sizes(self, effect_id: str, streams: Sequence[str]) -> dict[str, int]:
        return {s: (await self.read_output(effect_id, s, 0, 1)).size for s in streams}

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
        # One receive is kept pending across idle checks: asyncio.wait never cancels it, so no
        # frame is ever taken off the socket and then lost.
        recv: asyncio.Future[builtins.list[bytes]] | None = None
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, stream_hwm())
            autostart.check_runtime_dir(self.endpoints.runtime)
            sub.connect(self.endpoints.stream)
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            recv = asyncio.ensure_future(sub.recv_multipart())
            # The daemon answers a subscription with a 'subscribed' event: from then on nothing
            # published is missed (and anything earlier is in the store). The frame that ends
            # this wait stays in ``recv`` and is handled below.
            await asyncio.wait((recv,), timeout=SUBSCRIBED_WAIT)
            for name in streams:
                async for chunk in self._fill(effect_id, f, name, None):
                    yield chunk
            if (await self.status(effect_id)).final:
                f.finished(await self._final_sizes(effect_id, streams))
            last_progress = time.monotonic()
            while not f.complete:
                if f.final_sizes is not None:
                    for name in streams:
                        async for chunk in self._fill(effect_id, f, name, f.final_sizes[name]):
                            yield chunk
                    break
                # Check the store when nothing arrives, and also when only unrelated messages
                # arrive (other subscribers' 'subscribed' events): a dropped 'finished' must not
                # leave the stream waiting forever.
                quiet = time.monotonic() - last_progress >= IDLE_CHECK
                if not quiet:
                    await asyncio.wait((recv,), timeout=IDLE_CHECK)
                if quiet or not recv.done():
                    last_progress = time.monotonic()
                    for name in streams:
                        async for chunk in self._fill(effect_id, f, name, None):
                            yield chunk
                    if (await self.status(effect_id)).final:
                        f.finished(await self._final_sizes(effect_id, streams))
                    continue
                if recv.cancelled():  # the client was closed under us
                    raise DaemonUnavailable("the client was closed during the stream")
                frames = recv.result()
                recv = asyncio.ensure_future(sub.recv_multipart())
                live = parse_frame(frames)
                if live == FINISHED:
                    f.finished(await self._final_sizes(effect_id, streams))
                    continue
                if not isinstance(live, Chunk):
                    continue
                part, gap = f.accept(live)
                if gap is not None:
                    f.gaps_filled += 1
                    async for chunk in self._fill(effect_id, f, gap[0], gap[2]):
                        yield chunk
                    part, _ = f.accept(live)
                if part is not None:
                    last_progress = time.monotonic()
                    yield part
        finally:
            self.last_follower = f
            if recv is not None and not recv.done():
                recv.cancel()
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


def _ignore_send_outcome(fut: asyncio.Future[Any]) -> None:
    # A send that failed or was cancelled (socket closed by a reconnect) is covered by the
    # reply timeout and the resend; retrieve the exception so asyncio does not log it.
    if not fut.cancelled():
        with contextlib.suppress(Exception):
            fut.exception()
