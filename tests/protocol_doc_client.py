"""A client written from docs/protocol.md alone, following its text literally.

It deliberately shares no code with ``effectd.client``: the tests that use it check the
document, not the reference client. What it implements, and where the document says so:

* §1.2 socket options: ``LINGER=0`` on every socket, ``IMMEDIATE`` left at its default (0) on
  the REQ socket, a ``RCVHWM`` on the SUB socket;
* §10.3 Lazy Pirate retries with a REQ socket (close and reopen on timeout, resend the same
  request with the same ``rid``, give up after N retries);
* §9 the exact-stream loop, step by step, including the idle check.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

REQ_OPTIONS = {zmq.LINGER: 0}
"""§1.2: LINGER=0 on the REQ socket; IMMEDIATE is not set (stays 0)."""
SUB_RCVHWM = 256
SUBSCRIBED_WAIT = 2.0
"""§9 step 2: wait up to 2 s for the first message."""
MIB = 1024 * 1024
SEND_BLOCK_LIMIT = 3.0
"""Seconds a send may block before the test calls it a hang (a live daemon takes milliseconds)."""


class DocUnavailable(Exception):
    """§10.3 step 4: no reply after all retries."""


class DocError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class DocClient:
    def __init__(self, runtime: Path, *, timeout: float = 5.0, retries: int = 2, idle: float = 1.0) -> None:
        self.control = f"ipc://{runtime}/control.sock"
        self.stream_ep = f"ipc://{runtime}/stream.sock"
        self.timeout = timeout
        self.retries = retries
        self.idle = idle  # §9 step 5: "about 1 s"; tests may shorten it
        self.ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] | None = None
        self._rids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    # ---- §1.2, §10.3 ----------------------------------------------------------------------

    def req_socket(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.REQ)
        for option, value in REQ_OPTIONS.items():
            sock.setsockopt(option, value)
        sock.connect(self.control)
        return sock

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return {"v": 1, "rid": f"doc-{os.getpid()}-{next(self._rids)}", "op": op, **fields}

    @staticmethod
    def send(sock: zmq.Socket[bytes], msg: dict[str, Any]) -> None:
        """A plain (blocking) send, as §10.3 step 1 has it, except that a send still blocked
        after ``SEND_BLOCK_LIMIT`` fails the test instead of hanging it: the documented retry
        loop only times out the reply, so a send must never wait for a daemon."""
        try:
            sock.send(pack(msg), zmq.NOBLOCK)
        except zmq.Again:
            if not sock.poll(int(SEND_BLOCK_LIMIT * 1000), zmq.POLLOUT):
                raise AssertionError(f"a REQ send with the documented options blocked ({msg['op']})") from None
            sock.send(pack(msg), zmq.NOBLOCK)

    def call(self, op: str, *, reply_timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        msg = self.request(op, **fields)
        wait = self.timeout if reply_timeout is None else reply_timeout
        for _ in range(1 + self.retries):
            if self._sock is None:
                self._sock = self.req_socket()
            self.send(self._sock, msg)
            if self._sock.poll(int(wait * 1000), zmq.POLLIN):
                reply = unpack(self._sock.recv())
                if reply.get("rid") != msg["rid"]:
                    continue  # §10.3 step 5
                if not reply["ok"]:
                    raise DocError(reply["error"]["code"], reply["error"]["message"])
                return reply  # type: ignore[no-any-return]
            self._sock.close(linger=0)  # §10.3 step 2
            self._sock = None
        raise DocUnavailable(f"no reply to {op} after {1 + self.retries} attempt(s)")

    def read_output(self, eid: str, s: str, offset: int, max_bytes: int) -> dict[str, Any]:
        return self.call("read_output", id=eid, stream=s, offset=offset, max_bytes=max_bytes)

    # ---- §9 -------------------------------------------------------------------------------

    def follow(self, eid: str, streams: tuple[str, ...] = ("stdout", "stderr"), from_offset: int = 0,
               after_catch_up: Callable[[], None] | None = None) -> dict[str, bytes]:
        """The §9 pseudo-code line by line. Returns the delivered bytes per stream; every
        event received is appended to ``self.events``. ``after_catch_up`` runs after step 3
        (test instrumentation: lets the effect start producing)."""
        expected = {s: from_offset for s in streams}
        out = {s: bytearray() for s in streams}
        final_sizes: dict[str, int] | None = None
        last_check = time.monotonic()

        def deliver(s: str, offset: int, data: bytes) -> None:
            nonlocal last_check
            assert offset == from_offset + len(out[s]), (s, offset, len(out[s]))
            out[s] += data
            last_check = time.monotonic()

        def fill(s: str, until: int | None) -> None:
            while until is None or expected[s] < until:
                want = MIB if until is None else min(until - expected[s], 8 * MIB)
                r = self.read_output(eid, s, expected[s], want)
                data = r["data"]
                if len(data) > 0 and r["offset"] <= expected[s] < r["offset"] + len(data):
                    deliver(s, expected[s], data[expected[s] - r["offset"]:])
                    expected[s] = r["offset"] + len(data)
                if len(data) == 0:
                    return
                if until is None and r["next_offset"] >= r["size"]:
                    return

        def store_sizes() -> dict[str, int]:
            return {s: self.read_output(eid, s, 0, 1)["size"] for s in streams}

        def apply(s: str, offset: int, data: bytes) -> None:
            end = offset + len(data)
            if end <= expected[s]:
                return
            if offset > expected[s]:
                fill(s, until=offset)
                if end <= expected[s]:
                    return
                if offset > expected[s]:
                    return
            deliver(s, expected[s], data[expected[s] - offset:])
            expected[s] = end

        def handle(msg: list[bytes]) -> None:
            nonlocal final_sizes
            if len(msg) != 3:
                return
            try:
                header = unpack(msg[1])
            except Exception:
                return
            if not isinstance(header, dict):
                return
            if header.get("stream") == "event":
                self.events.append(header)
                if header.get("event") == "finished":
                    final_sizes = store_sizes()
                return
            s = header.get("stream")
            if s not in streams:
                return
            apply(s, header["offset"], bytes(msg[2]))

        def receive(timeout: float) -> list[bytes] | None:
            if sub.poll(int(timeout * 1000), zmq.POLLIN):
                return sub.recv_multipart()
            return None

        sub: zmq.Socket[bytes] = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
        sub.connect(self.stream_ep)
        sub.setsockopt(zmq.SUBSCRIBE, eid.encode())                      # 1.
        try:
            sub.poll(int(SUBSCRIBED_WAIT * 1000), zmq.POLLIN)               # 2.
            for s in streams:                                               # 3.
                fill(s, until=None)
            if self.call("status", ids=[eid])["effects"][0]["state"] in FINAL:
                final_sizes = store_sizes()
            if after_catch_up is not None:
                after_catch_up()
            last_check = time.monotonic()
            while True:
                if final_sizes is not None:                                 # 4.
                    for s in streams:
                        fill(s, until=final_sizes[s])
                    return {s: bytes(b) for s, b in out.items()}
                msg = receive(timeout=self.idle)
                if msg is not None:
                    handle(msg)
                if final_sizes is None and (msg is None or time.monotonic() - last_check >= self.idle):  # 5.
                    for s in streams:
                        fill(s, until=None)
                    if self.read_output(eid, streams[0], expected[streams[0]], 1)["final"]:
                        final_sizes = store_sizes()
                    last_check = time.monotonic()
        finally:
            sub.close(linger=0)


FINAL = ("succeeded", "failed", "cancelled", "timed_out", "lost")
