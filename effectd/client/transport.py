"""The client's REQ channel with Lazy Pirate reliability.

A request waits for its reply with a timeout. On timeout the REQ socket is closed (linger 0) and
reopened, and the *same* request (same ``rid``; mutating requests also carry an idempotency key)
is sent again, up to ``retries`` times; then :class:`DaemonUnavailable`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import zmq

from effectd.ipc import codec
from effectd.ipc.errors import DaemonUnavailable, EffectdError, error_from_wire


def check_reply(reply: Any) -> dict[str, Any]:
    """The ``ok`` reply map, or the exception an error reply stands for (both clients)."""
    if not isinstance(reply, dict):
        raise EffectdError("daemon sent a reply that is not a map")
    if reply.get("ok"):
        return reply
    err = reply.get("error")
    err = err if isinstance(err, dict) else {}
    raise error_from_wire(str(err.get("code", "internal")), str(err.get("message", "")))


class ReqChannel:
    def __init__(self, ctx: zmq.Context[Any], endpoint: str, *, timeout: float, retries: int,
                 check: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.check = check
        """Called before every (re)connect; raises to refuse the endpoint (an unsafe runtime dir)."""
        self.timeout = timeout
        self.retries = retries
        self._sock: zmq.Socket[bytes] | None = None
        self._counter = itertools.count(1)
        self._prefix = f"{os.getpid()}-{os.urandom(3).hex()}-"

    def next_rid(self) -> str:
        return f"{self._prefix}{next(self._counter)}"

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            if self.check is not None:
                self.check()
            sock: zmq.Socket[bytes] = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            # No IMMEDIATE: with it, libzmq drops the replies still queued unread on this socket
            # when the daemon disconnects (a daemon that answers and exits), and a send blocks
            # while no daemon is connected. Without it, a request waits in the pipe for a daemon
            # and the reply timeout covers the rest.
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def retarget(self, endpoint: str) -> None:
        """Talk to ``endpoint`` from the next request on (the live daemon's own runtime dir)."""
        if endpoint != self.endpoint:
            self.reset()
            self.endpoint = endpoint

    def reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def call(self, msg: dict[str, Any], *, timeout: float | None = None, retries: int | None = None) -> dict[str, Any]:
        """Send ``msg`` and return the ``ok`` reply, raising the mapped exception on errors."""
        data = codec.pack(msg)
        wait = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if retries is None else retries)
        for _ in range(attempts):
            sock = self._socket()
            sock.send(data, zmq.NOBLOCK)  # never EAGAIN: a REQ queues one request, and no IMMEDIATE
            if sock.poll(int(wait * 1000), zmq.POLLIN):
                reply = codec.unpack(sock.recv(), max_bytes=codec.MAX_WORKER_MESSAGE_BYTES)
                if isinstance(reply, dict) and reply.get("rid") != msg.get("rid"):
                    self.reset()  # a stale reply to an earlier request: resynchronise
                    continue
                return check_reply(reply)
            self.reset()
        raise DaemonUnavailable(f"no reply from effectd at {self.endpoint} after {attempts} attempt(s) "
                                f"of {wait:.1f}s")

    def close(self) -> None:
        self.reset()
