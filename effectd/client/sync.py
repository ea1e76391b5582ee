"""The synchronous client: ``Client()`` talks to the daemon of the current runtime dir.

Every operation is written once, without I/O, in ``core.py`` (streams: ``follow.py``); this
module performs its steps with a blocking REQ socket (:class:`~effectd.client.transport.ReqChannel`)
and a SUB socket per stream.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import zmq

from effectd.client import autostart, core
from effectd.client.core import DEFAULT_RETRIES, DEFAULT_TIMEOUT, WAIT_SLICE, Machine, Ops, Step
from effectd.client.follow import Follower, follow
from effectd.client.records import Chunk, EffectRecord, OutputSlice
from effectd.client.spec import python_spec, shell_spec, sleep_spec
from effectd.client.transport import ReqChannel
from effectd.ipc.endpoints import Endpoints, check_topic, runtime_dir, state_dir, stream_hwm
from effectd.ipc.errors import DaemonUnavailable
from effectd.ipc.schema import build_request

__all__ = ["DEFAULT_RETRIES", "DEFAULT_TIMEOUT", "WAIT_SLICE", "Client"]

T = TypeVar("T")


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
        return self._run(core.probe())

    def connect(self) -> None:
        """Make sure a daemon answers (starting one if allowed). The daemon is the one of our
        runtime dir, or the one that owns our state dir (wherever its runtime dir is)."""
        if self._connected:
            return
        found = autostart.locate(self.runtime, self.state, autostart=self._autostart)
        if found is None:
            found = autostart.ensure_daemon(self.runtime, self.state, self._probe, self._start_timeout)
        self._use(found)
        self._connected = True

    def call(self, op: str, *, reply_timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request; ``reply_timeout`` bounds each attempt (Lazy Pirate)."""
        self.connect()
        msg = build_request(op, self.channel.next_rid(), **args)
        try:
            return self.channel.call(msg, timeout=reply_timeout)
        except DaemonUnavailable as exc:
            if not self._autostart or not autostart.went_away(exc, self.runtime, self.state):
                raise
            self._connected = False  # the daemon went away: start another and retry once
            self.connect()
            return self.channel.call(msg, timeout=reply_timeout)

    # ---- driving the core -----------------------------------------------------------------

    def _steps(self, m: Machine[Any], sub: zmq.Socket[bytes] | None = None) -> Iterator[Any]:
        """Perform the steps of one core operation; yield what it emits."""
        try:
            while (step := m.next()) is not None:
                if isinstance(step, core.Emit):
                    yield step.item
                    continue
                with m.outcome():
                    m.give(self._perform(step, sub))
        finally:
            m.close()

    def _perform(self, step: Step, sub: zmq.Socket[bytes] | None) -> Any:
        if isinstance(step, core.Call):
            timeout = step.attempt_timeout(self.channel.timeout)
            if step.direct:
                msg = build_request(step.op, self.channel.next_rid(), **step.args)
                return self.channel.call(msg, timeout=timeout, retries=step.retries)
            return self.call(step.op, reply_timeout=timeout, **step.args)
        if isinstance(step, core.Sleep):
            time.sleep(step.seconds)
            return None
        if sub is None:
            raise TypeError(f"{step!r} outside a stream")
        if isinstance(step, core.Poll):
            return bool(sub.poll(int(step.timeout * 1000), zmq.POLLIN))
        return sub.recv_multipart()

    def _run(self, ops: Ops[T]) -> T:
        m = Machine(ops)
        for item in self._steps(m):
            raise TypeError(f"a request operation emitted {item!r}")
        return m.value

    # ---- operations -----------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self._run(core.hello(f"effectd.client/{os.getpid()}"))

    def submit(self, effect: Mapping[str, Any], *, request_key: str | None = None) -> str:
        """Submit an effect specification; returns its id once the daemon journaled it."""
        return self._run(core.submit(effect, request_key))

    def submit_many(self, effects: Sequence[Mapping[str, Any]], *,
                    request_key: str | None = None) -> builtins.list[str]:
        """Submit several effects in one atomic commit."""
        return self._run(core.submit_many(effects, request_key))

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
        return self._run(core.status(effect_id))

    def status_many(self, ids: Sequence[str]) -> builtins.list[EffectRecord]:
        return self._run(core.status_many(ids))

    def list(self, *, states: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
             name: str | None = None, limit: int = 100, before: str | None = None) -> builtins.list[EffectRecord]:
        return self._run(core.list_effects(states, labels, name, limit, before))

    def wait(self, effect_id: str, timeout: float | None = None) -> EffectRecord:
        """Block until the effect is final (or ``timeout`` passes) and return its record."""
        return self.wait_many([effect_id], timeout=timeout)[0]

    def wait_many(self, ids: Sequence[str], timeout: float | None = None,
                  return_when: str = "all") -> builtins.list[EffectRecord]:
        """Wait for all (``return_when="all"``) or the first (``"first"``) of ``ids``."""
        return self._run(core.wait_many(ids, timeout, return_when))

    def as_completed(self, ids: Sequence[str], timeout: float | None = None) -> Iterator[EffectRecord]:
        """Yield effects as they become final, in completion order. The daemon parks each wait
        and answers at the first completion: no polling."""
        return self._steps(Machine(core.as_completed(ids, timeout)))

    def result(self, effect_id: str) -> EffectRecord:
        """The record of a final effect (raises InvalidState while it runs)."""
        return self._run(core.result(effect_id))

    def cancel(self, *ids: str, reason: str | None = None) -> builtins.list[dict[str, Any]]:
        return self._run(core.cancel(ids, reason))

    def read_output(self, effect_id: str, stream: str = "stdout", offset: int = 0,
                    max_bytes: int | None = None) -> OutputSlice:
        """Stored bytes from ``offset`` (possibly fewer than ``max_bytes``); a ``busy`` answer
        (the daemon's read budget is in use by other readers) is retried after a short backoff."""
        return self._run(core.read_output(effect_id, stream, offset, max_bytes))

    def output(self, effect_id: str, stream: str = "stdout") -> bytes:
        """Everything stored so far for one stream."""
        return self._run(core.output(effect_id, stream))

    def set_group_limit(self, name: str, parallel: int | None) -> None:
        """Limit how many effects of ``group`` run at once (None: no limit). Persisted."""
        self._run(core.set_group_limit(name, parallel))

    def groups(self) -> builtins.list[dict[str, Any]]:
        return self._run(core.groups())

    def gc(self, *, retain_days: float | None = None, retain_count: int | None = None,
           retain_bytes: int | None = None) -> dict[str, Any]:
        """Delete old final effects and their output now; returns what was freed."""
        return self._run(core.gc(retain_days, retain_count, retain_bytes))

    def shutdown(self, drain: bool = True) -> None:
        self._run(core.shutdown(drain))

    # ---- streams --------------------------------------------------------------------------

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
            yield from self._steps(Machine(follow(effect_id, f)), sub)
        finally:
            sub.close(linger=0)

    def values(self, effect_id: str) -> Iterator[Any]:
        """The values a python generator effect yields, decoded, live and in order."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        for chunk in self.stream(effect_id, streams=("value",)):
            unpacker.feed(chunk.data)
            yield from unpacker
