"""The synchronous client: ``Client()`` talks to the daemon of the current runtime dir."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq

from effectd.client import autostart
from effectd.client.follow import FINISHED, IDLE_CHECK, SUBSCRIBED_WAIT, Follower, busy_backoff, parse_frame
from effectd.client.records import Chunk, EffectRecord, OutputSlice
from effectd.client.spec import python_spec, shell_spec, sleep_spec
from effectd.client.transport import ReqChannel, batch_reply_timeout
from effectd.ipc.endpoints import Endpoints, check_topic, runtime_dir, state_dir, stream_hwm
from effectd.ipc.errors import Busy, DaemonUnavailable, UnsafeDirectory
from effectd.ipc.schema import EffectState, build_request

DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
WAIT_SLICE = 30.0
"""A wait without timeout is a loop of server-side waits this long (detects a dead daemon)."""


class Client:
    """A connection to one effectd daemon.

    >>> with Client() as c:
    ...     eid = c.submit_shell("make test")
    ...     for chunk in c.stream(eid):
    ...         print(chunk.data.decode(), end="")
    ...     print(c.wait(eid).exit_code)
    """

    def __init__(self, runtime: str | os.PathLike[str] | None = None, *, state: str | os.PathLike[str] | None = None,
                 autostart: bool = True, timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 start_timeout: float = autostart.DEFAULT_START_TIMEOUT) -> None:
        self.runtime = Path(runtime) if runtime is not None else runtime_dir()
        self.state = Path(state) if state is not None else state_dir()
        self.endpoints = Endpoints.for_runtime(self.runtime)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.channel = ReqChannel(self.ctx, self.endpoints.control, timeout=timeout, retries=retries,
                                  check=self._check_runtime)
        self._autostart = autostart
        self._start_timeout = start_timeout
        self._connected = False

    # ---- plumbing -------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()
        self.ctx.term()

    def _check_runtime(self) -> None:
        autostart.check_runtime_dir(self.endpoints.runtime)

    def _use(self, runtime: Path) -> None:
        """Talk to the daemon whose runtime dir is ``runtime`` (``self.runtime`` stays as asked)."""
        if runtime != self.endpoints.runtime:
            self.endpoints = Endpoints.for_runtime(runtime)
            self.channel.retarget(self.endpoints.control)

    def _probe(self, runtime: Path) -> bool:
        self._use(runtime)
        try:
            self.channel.call(build_request("hello", self.channel.next_rid()), timeout=0.5, retries=0)
            return True
        except UnsafeDirectory:
            raise
        except DaemonUnavailable:
            return False

    def connect(self) -> None:
        """Make sure a daemon answers (starting one if allowed). The daemon is the one of our
        runtime dir, or the one that owns our state dir (wherever its runtime dir is)."""
        if self._connected:
            return
        found = autostart.find_daemon(self.runtime, self.state)
        if found is None:
            if not self._autostart:
                raise DaemonUnavailable(f"effectd is not running for {self.runtime} (autostart disabled)")
            found = autostart.ensure_daemon(self.runtime, self.state, self._probe, self._start_timeout)
        self._use(found)
        self._connected = True

    def call(self, op: str, *, reply_timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request; ``reply_timeout`` bounds each attempt (Lazy Pirate)."""
        self.connect()
        msg = build_request(op, self.channel.next_rid(), **args)
        try:
            return self.channel.call(msg, timeout=reply_timeout)
        except UnsafeDirectory:
            raise
        except DaemonUnavailable:
            if not self._autostart or autostart.find_daemon(self.runtime, self.state) is not None:
                raise
            self._connected = False  # the daemon went away: start another and retry once
            self.connect()
            return self.channel.call(msg, timeout=reply_timeout)

    # ---- operations -----------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.call("hello", client=f"effectd.client/{os.getpid()}")

    def submit(self, effect: Mapping[str, Any], *, request_key: str | None = None) -> str:
        """Submit an effect specification; returns its id once the daemon journaled it."""
        key = request_key or f"{os.getpid()}-{os.urandom(8).hex()}"
        return str(self.call("submit", effect=dict(effect), request_key=key)["id"])

    def submit_many(self, effects: Sequence[Mapping[str, Any]], *,
                    request_key: str | None = None) -> builtins.list[str]:
        """Submit several effects in one atomic commit."""
        key = request_key or f"{os.getpid()}-{os.urandom(8).hex()}"
        return list(self.call("submit_many", effects=[dict(e) for e in effects], request_key=key,
                              reply_timeout=batch_reply_timeout(self.channel.timeout, len(effects)))["ids"])

    def submit_shell(self, command: str | Sequence[str], **options: Any) -> str:
        """Run a shell command (string: via /bin/sh -c; sequence: argv). See :func:`shell_spec`."""
        return self.submit(shell_spec(command, **options))

    def submit_python(self, target: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                      **options: Any) -> str:
        """Call ``"package.module:function"`` in a worker. See :func:`python_spec`."""
        return self.submit(python_spec(target, args, kwargs, **options))

    def submit_sleep(self, seconds: float, **options: Any) -> str:
        return self.submit(sleep_spec(seconds, **options))

    def status(self, effect_id: str) -> EffectRecord:
        return self.status_many([effect_id])[0]

    def status_many(self, ids: Sequence[str]) -> builtins.list[EffectRecord]:
        return [EffectRecord.from_wire(r) for r in self.call("status", ids=list(ids))["effects"]]

    def list(self, *, states: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
             name: str | None = None, limit: int = 100, before: str | None = None) -> builtins.list[EffectRecord]:
        out: builtins.list[EffectRecord] = []
        while True:  # a page the daemon cut at its reply limit ("truncated") continues from its last id
            reply = self.call("list", states=list(states) if states else None,
                              labels=dict(labels) if labels else None, name=name, limit=limit - len(out),
                              before=before)
            out += [EffectRecord.from_wire(r) for r in reply["effects"]]
            if not reply.get("truncated") or not reply["effects"] or len(out) >= limit:
                return out
            before = out[-1].id

    def _wait(self, ids: builtins.list[str], timeout: float | None,
              first: bool) -> tuple[builtins.list[EffectRecord], bool]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else max(0.0, min(WAIT_SLICE, deadline - time.monotonic()))
            reply = self.call("wait", ids=ids, timeout=left, return_when="first" if first else "all",
                              reply_timeout=left + self.channel.timeout)
            records = [EffectRecord.from_wire(r) for r in reply["effects"]]
            if not reply["timed_out"] or (deadline is not None and time.monotonic() >= deadline):
                return records, bool(reply["timed_out"])

    def wait(self, effect_id: str, timeout: float | None = None) -> EffectRecord:
        """Block until the effect is final (or ``timeout`` passes) and return its record."""
        return self.wait_many([effect_id], timeout=timeout)[0]

    def wait_many(self, ids: Sequence[str], timeout: float | None = None,
                  return_when: str = "all") -> builtins.list[EffectRecord]:
        """Wait for all (``return_when="all"``) or the first (``"first"``) of ``ids``."""
        records, _ = self._wait(list(ids), timeout, return_when == "first")
        return records

    def as_completed(self, ids: Sequence[str], timeout: float | None = None) -> Iterator[EffectRecord]:
        """Yield effects as they become final, in completion order. The daemon parks each wait
        and answers at the first completion: no polling."""
        pending = list(dict.fromkeys(ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            records, timed_out = self._wait(pending, left, first=True)
            done = sorted((r for r in records if r.final), key=lambda r: (r.finished_at or 0, r.id))
            if not done and timed_out:
                raise TimeoutError(f"{len(pending)} effect(s) not finished within {timeout}s")
            for rec in done:
                pending.remove(rec.id)
                yield rec

    def result(self, effect_id: str) -> EffectRecord:
        """The record of a final effect (raises InvalidState while it runs)."""
        reply = self.call("result", id=effect_id)
        rec = self.status(effect_id)
        return rec if rec.final else EffectRecord.from_wire({**rec.to_json(), **reply})

    def cancel(self, *ids: str, reason: str | None = None) -> builtins.list[dict[str, Any]]:
        return list(self.call("cancel", ids=list(ids), reason=reason)["effects"])

    def read_output(self, effect_id: str, stream: str = "stdout", offset: int = 0,
                    max_bytes: int | None = None) -> OutputSlice:
        """Stored bytes from ``offset`` (possibly fewer than ``max_bytes``); a ``busy`` answer
        (the daemon's read budget is in use by other readers) is retried after a short backoff."""
        delays = busy_backoff()
        while True:
            try:
                r = self.call("read_output", id=effect_id, stream=stream, offset=offset, max_bytes=max_bytes)
                break
            except Busy:
                delay = next(delays, None)
                if delay is None:
                    raise
                time.sleep(delay)
        return OutputSlice(r["id"], r["stream"], r["offset"], bytes(r["data"]), r["next_offset"], r["size"],
                           EffectState(r["state"]), bool(r["eof"]))

    def output(self, effect_id: str, stream: str = "stdout") -> bytes:
        """Everything stored so far for one stream."""
        parts = []
        offset = 0
        while True:
            piece = self.read_output(effect_id, stream, offset)
            parts.append(piece.data)
            offset = piece.next_offset
            if not piece.data or offset >= piece.size:
                return b"".join(parts)

    def set_group_limit(self, name: str, parallel: int | None) -> None:
        """Limit how many effects of ``group`` run at once (None: no limit). Persisted."""
        self.call("group_set", name=name, parallel=parallel)

    def groups(self) -> builtins.list[dict[str, Any]]:
        return list(self.call("groups")["groups"])

    def gc(self, *, retain_days: float | None = None, retain_count: int | None = None,
           retain_bytes: int | None = None) -> dict[str, Any]:
        """Delete old final effects and their output now; returns what was freed."""
        reply = self.call("gc", retain_days=retain_days, retain_count=retain_count, retain_bytes=retain_bytes)
        return {k: reply[k] for k in ("removed", "freed_bytes", "kept", "kept_bytes")}

    def shutdown(self, drain: bool = True) -> None:
        self.call("shutdown", drain=drain)

    # ---- streams --------------------------------------------------------------------------

    def _fill(self, effect_id: str, f: Follower, stream: str, until: int | None) -> Iterator[Chunk]:
        """Read the store from f.expected[stream] up to ``until`` (None: to the current end)."""
        while (window := f.read_window(stream, until)) is not None:
            chunk, more = f.apply_read(stream, until, self.read_output(effect_id, stream, *window))
            if chunk is not None:
                yield chunk
            if not more:
                return

    def stream(self, effect_id: str, from_offset: int = 0,
               streams: Sequence[str] = ("stdout", "stderr")) -> Iterator[Chunk]:
        """Every byte the effect writes, in order, from ``from_offset``; ends when it is final.

        Subscribes first, replays what is stored, then continues live; gaps (dropped PUB
        messages) are filled from the store, duplicates dropped. Exact by construction."""
        f = Follower.start(streams, from_offset)
        topic = check_topic(effect_id.encode())
        self.connect()
        self._check_runtime()
        sub: zmq.Socket[bytes] = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, stream_hwm())
        sub.connect(self.endpoints.stream)
        sub.setsockopt(zmq.SUBSCRIBE, topic)
        try:
            # The daemon answers a subscription with a 'subscribed' event: from then on nothing
            # published is missed (and anything earlier is in the store).
            sub.poll(int(SUBSCRIBED_WAIT * 1000), zmq.POLLIN)
            for name in streams:
                yield from self._fill(effect_id, f, name, None)
            rec = self.status(effect_id)
            if rec.final:
                f.finished(self._final_sizes(effect_id, streams))
            last_progress = time.monotonic()
            while not f.complete:
                if f.final_sizes is not None:
                    for name in streams:
                        yield from self._fill(effect_id, f, name, f.final_sizes[name])
                    break
                # Check the store when nothing arrives, and also when only unrelated messages
                # arrive (other subscribers' 'subscribed' events) - a dropped 'finished' must
                # not leave us waiting forever.
                quiet = time.monotonic() - last_progress >= IDLE_CHECK
                if quiet or not sub.poll(int(IDLE_CHECK * 1000), zmq.POLLIN):
                    last_progress = time.monotonic()
                    for name in streams:
                        yield from self._fill(effect_id, f, name, None)
                    rec = self.status(effect_id)
                    if rec.final:
                        f.finished(self._final_sizes(effect_id, streams))
                    continue
                chunk = parse_frame(sub.recv_multipart())
                if chunk == FINISHED:
                    f.finished(self._final_sizes(effect_id, streams))
                    continue
                if not isinstance(chunk, Chunk):
                    continue
                part, gap = f.accept(chunk)
                if gap is not None:
                    f.gaps_filled += 1
                    yield from self._fill(effect_id, f, gap[0], gap[2])
                    part, _ = f.accept(chunk)
                if part is not None:
                    last_progress = time.monotonic()
                    yield part
        finally:
            self.last_follower = f
            sub.close(linger=0)

    def _final_sizes(self, effect_id: str, streams: Sequence[str]) -> dict[str, int]:
        return {s: self.read_output(effect_id, s, 0, 1).size for s in streams}

    def values(self, effect_id: str) -> Iterator[Any]:
        """The values a python generator effect yields, decoded, live and in order."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        for chunk in self.stream(effect_id, streams=("value",)):
            unpacker.feed(chunk.data)
            yield from unpacker
