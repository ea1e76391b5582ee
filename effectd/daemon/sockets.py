"""The daemon's four sockets: options, binding in the runtime dir, and the stream forwarder.

Sockets (all bound in the 0700 runtime dir, socket files 0600):
  control  ROUTER  clients' REQ/DEALER requests
  stream   XPUB    output chunks and lifecycle events to clients' SUB sockets
  workers  ROUTER  workers' DEALER sockets
  publish  XSUB    workers' PUB sockets (chunks forwarded to ``stream``)
"""

from __future__ import annotations

import contextlib
import os

import zmq

from effectd.ipc import codec
from effectd.ipc.endpoints import Endpoints, stream_hwm

MAX_BATCH = 512
"""Messages taken from one socket per loop turn (fairness between clients, workers, streams)."""
TOPIC_BYTES = 26
"""An effect id (ULID): the topic of its stream."""


class Sockets:
    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.ctx: zmq.Context[zmq.Socket[bytes]]
        self.control: zmq.Socket[bytes]
        self.workers: zmq.Socket[bytes]
        self.stream: zmq.Socket[bytes]
        self.publish: zmq.Socket[bytes]

    def all(self) -> tuple[zmq.Socket[bytes], ...]:
        return (self.control, self.workers, self.stream, self.publish)

    def bind(self) -> None:
        ctx = self.ctx = zmq.Context()
        old_umask = os.umask(0o077)  # socket files 0600
        try:
            self.control = ctx.socket(zmq.ROUTER)
            self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # Twice the decoder's limit: a request somewhat too large gets a too_large reply; a
            # huge one makes libzmq drop the connection before it is buffered.
            self.control.setsockopt(zmq.MAXMSGSIZE, 2 * codec.MAX_REQUEST_BYTES)
            self.control.setsockopt(zmq.LINGER, 500)
            self.control.setsockopt(zmq.SNDHWM, 10_000)
            self.workers = ctx.socket(zmq.ROUTER)
            self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.workers.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.workers.setsockopt(zmq.MAXMSGSIZE, codec.MAX_WORKER_MESSAGE_BYTES)
            self.workers.setsockopt(zmq.LINGER, 500)
            self.stream = ctx.socket(zmq.XPUB)
            self.stream.setsockopt(zmq.XPUB_VERBOSE, 1)
            self.stream.setsockopt(zmq.SNDHWM, stream_hwm())
            self.stream.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscribers only send subscriptions
            self.stream.setsockopt(zmq.LINGER, 0)
            self.publish = ctx.socket(zmq.XSUB)
            self.publish.setsockopt(zmq.RCVHWM, stream_hwm())
            self.publish.setsockopt(zmq.LINGER, 0)
            self.bind_endpoints()
        finally:
            os.umask(old_umask)

    def bind_endpoints(self) -> None:
        """Bind (again) at the endpoints' paths; the caller sets the umask."""
        ep = self.endpoints
        for sock, addr in ((self.control, ep.control), (self.workers, ep.workers),
                           (self.stream, ep.stream), (self.publish, ep.publish)):
            path = addr[len("ipc://"):]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale file of a dead daemon; we hold the lock
            sock.bind(addr)
            os.chmod(path, 0o600)

    def forward_chunks(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = self.publish.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            with contextlib.suppress(zmq.Again):
                self.stream.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def forward_subscriptions(self) -> list[bytes]:
        """Pass clients' (un)subscriptions on to the workers' PUB sockets, so they filter at the
        source; returns the topics (effect ids) newly subscribed to, to be told they are live."""
        subscribed: list[bytes] = []
        for _ in range(MAX_BATCH):
            try:
                msg = self.stream.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not msg or msg[0] not in (0, 1):
                continue
            self.publish.send(msg)
            topic = msg[1:]
            if msg[0] == 1 and len(topic) == TOPIC_BYTES:
                subscribed.append(topic)
        return subscribed

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        self.ctx.term()

    def unlink(self) -> None:
        ep = self.endpoints
        for addr in (ep.control, ep.stream, ep.workers, ep.publish):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr[len("ipc://"):])
