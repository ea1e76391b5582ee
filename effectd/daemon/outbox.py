"""What the loop sends, held until the turn's journal batch is committed.

Replies, assignments and events are queued during a turn and sent only after the commit
(group commit: nothing is acknowledged before it is durable). If the commit fails, the
``durable`` messages of the batch are refused: a reply becomes the commit's error, an
assignment, ack or event is dropped (the journal is the truth); control messages (cancel,
stop, read-only replies) go out regardless.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from effectd.daemon.sockets import Sockets
from effectd.ipc import auth, codec, messages, records
from effectd.ipc.errors import EffectdError, InternalError, TooLarge, Unavailable
from effectd.ipc.schema import request_id_of

log = logging.getLogger("effectd.daemon")


class Outbox:
    def __init__(self, sockets: Sockets) -> None:
        self.sockets = sockets
        self.worker_key = b""
        """The key every daemon->worker message is signed with (effectd.ipc.auth)."""
        self._items: list[tuple[zmq.Socket[bytes], list[bytes], bool]] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def queue(self, sock: zmq.Socket[bytes], frames: list[bytes], durable: bool = True) -> None:
        self._items.append((sock, frames, durable))

    def reply(self, ident: bytes, request_id: Any, reply: records.Reply, durable: bool = True) -> None:
        """Queue a reply. ``durable`` replies (to mutating requests, and waits reporting final
        states) are replaced by ``disk_full`` if the batch fails to commit; read-only replies
        are sent regardless, so a daemon on a full disk still answers hello/status/list."""
        failure: EffectdError | None = None
        try:
            reply.rid = request_id
            body = records.encode_reply(reply)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. msgpack's recursion limit
            log.error("reply to %r could not be encoded: %s", request_id, exc)
            failure = InternalError(f"reply could not be encoded: {exc}")
        except MemoryError:
            # Answered after the except block, once the partial encoding is freed.
            failure = InternalError("the daemon ran out of memory encoding the reply; ask for less")
        if failure is None and len(body) > codec.MAX_REPLY_BYTES:  # the last line of defence
            failure = TooLarge(f"the reply would be {len(body)} bytes, over the limit of "
                               f"{codec.MAX_REPLY_BYTES}; ask for less")
        if failure is not None:
            body = b""
            self.reply_error(ident, request_id, failure)
            return
        self.queue(self.sockets.control, [ident, b"", body], durable)

    def reply_error(self, ident: bytes, request_id: Any, exc: EffectdError) -> None:
        self.queue(self.sockets.control, [ident, b"", records.error_reply(request_id, exc.code, exc.message)],
                   durable=False)

    def to_worker(self, worker_id: str, msg: messages.DaemonMessage, durable: bool = True) -> None:
        """``durable`` messages (assign, ack) announce journaled facts and are dropped if the
        batch fails to commit; control messages (cancel, stop) are sent regardless."""
        try:
            body = messages.encode(msg)
        except (ValueError, TypeError, OverflowError) as exc:
            log.error("message %s to worker %s could not be encoded: %s", type(msg).__name__, worker_id, exc)
            return
        self.send_worker(worker_id.encode(), body, durable)

    def send_worker(self, ident: bytes, body: bytes, durable: bool = False) -> None:
        """Every daemon->worker message carries the MAC of its body: workers drop anything else,
        so a process that binds a fake workers.sock cannot make them run anything."""
        self.queue(self.sockets.workers, [ident, body, auth.sign(self.worker_key, body)], durable)

    def publish_event(self, effect_id: str, event: messages.EventType, **fields: Any) -> None:
        header = messages.EventHeader(event=event, **fields)
        self.queue(self.sockets.stream, [effect_id.encode(), messages.encode(header), b""])

    def refuse_durable(self, exc: Unavailable) -> None:
        """The batch failed to commit: its replies become ``exc``; its other durable messages are dropped."""
        kept: list[tuple[zmq.Socket[bytes], list[bytes], bool]] = []
        for sock, frames, durable in self._items:
            if not durable:
                kept.append((sock, frames, durable))
            elif sock is self.sockets.control:
                try:
                    rid = request_id_of(codec.unpack(frames[2]))
                except EffectdError:
                    rid = None
                kept.append((sock, [frames[0], b"", records.error_reply(rid, exc.code, exc.message)], False))
            # assignments, acks and events of the failed batch are dropped: the journal is the truth
        self._items = kept

    def send_all(self) -> None:
        items, self._items = self._items, []
        for sock, frames, _ in items:
            try:
                # copy=False: large replies (read_output data) are handed to libzmq without a
                # second copy; small frames are copied anyway (pyzmq's copy_threshold).
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                # A client that went away (EHOSTUNREACH) or a full link: never let it stop us.
                log.debug("send dropped: %s", exc)
