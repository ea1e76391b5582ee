"""Flow control for ``read_output``: the daemon's memory stays bounded whatever the number of readers.

A ``read_output`` reply sits in the daemon (the loop turn's outbox, then the control ROUTER's pipe)
until its client takes it. ZeroMQ does not tell the daemon when that happens, so the daemon keeps a
ledger of the data bytes it has sent and not seen acknowledged. A client's next request, of any
op, acknowledges its replies sent in earlier loop turns: exact for REQ clients (a REQ socket cannot
send before it has received the previous reply); DEALER clients (the async and Node clients) read
replies as they arrive and are treated the same way. A reply nobody acknowledges (the client
vanished or reconnected) stops counting after ``CREDIT_TTL``.

A read is served with at most:

* its fair share of the total budget (``TOTAL_INFLIGHT`` / (replies in flight + 1)), at least
  ``MIN_SLICE`` (protocol: ``data`` may be shorter than ``max_bytes``);
* what the client identity has left of ``PER_CLIENT_INFLIGHT`` (requests it pipelines within one
  loop turn);
* what is left of ``TOTAL_INFLIGHT``.

When less than ``MIN_SLICE`` is left the read is answered ``busy`` and the client retries after a
short backoff. So the bytes of unacknowledged ``read_output`` replies never exceed
``TOTAL_INFLIGHT`` (docs/architecture.md, "Many followers").
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from effectd.ipc.errors import Busy

TOTAL_INFLIGHT = 64 * 1024 * 1024
TOTAL_ENV = "EFFECTD_READ_INFLIGHT"
"""Overrides TOTAL_INFLIGHT (bytes; tests set it tiny to force ``busy`` answers)."""
PER_CLIENT_INFLIGHT = 16 * 1024 * 1024
MIN_SLICE = 64 * 1024
CREDIT_TTL = 2.0
"""Seconds after which an unacknowledged reply no longer counts. A live client takes a reply in
milliseconds; replies nobody acknowledges are those of clients that closed or reconnected."""
LAST_REPLY_TTL = 0.25
"""The same for a reply that ends a final effect's stream (``eof``): it is usually the last
request of a follower that then closes, so nothing will acknowledge it."""

@dataclass
class _Reply:
    client: bytes
    nbytes: int
    since: float
    last: bool


def total_inflight(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get(TOTAL_ENV, TOTAL_INFLIGHT)))
    except ValueError:
        return TOTAL_INFLIGHT


class ReadCredits:
    def __init__(self, total: int = TOTAL_INFLIGHT, per_client: int = PER_CLIENT_INFLIGHT,
                 min_slice: int = MIN_SLICE, ttl: float = CREDIT_TTL) -> None:
        self.total = total
        self.per_client = per_client
        self.min_slice = min_slice
        self.ttl = ttl
        self.inflight = 0
        self.busy_answers = 0
        # Insertion order = age, one dict per TTL, so expiry only looks at the oldest entries.
        self._replies: dict[int, _Reply] = {}
        self._last_replies: dict[int, _Reply] = {}
        self._by_client: dict[bytes, list[int]] = {}
        self._client_bytes: dict[bytes, int] = {}
        self._seq = 0
        self._sent_up_to = 0  # replies up to this seq left the outbox in an earlier loop turn

    def request_from(self, client: bytes) -> None:
        """Any request from ``client`` acknowledges its replies sent in earlier loop turns."""
        seqs = self._by_client.get(client)
        if seqs:
            for seq in [q for q in seqs if q <= self._sent_up_to]:
                self._release(seq)

    def turn_flushed(self) -> None:
        """The loop turn's outbox was sent."""
        self._sent_up_to = self._seq

    def grant(self, client: bytes, wanted: int, now: float | None = None) -> int:
        """Bytes a read may return (≤ ``wanted``). Raises Busy when the budget is held by
        replies not read yet."""
        self._expire(time.monotonic() if now is None else now)
        client_left = self.per_client - self._client_bytes.get(client, 0)
        total_left = self.total - self.inflight
        if min(client_left, total_left) < min(self.min_slice, wanted):
            self.busy_answers += 1
            raise Busy(f"{self.inflight} bytes of read_output replies are not read yet by their "
                       f"clients; retry shortly")
        share = max(self.min_slice, self.total // (len(self._replies) + len(self._last_replies) + 1))
        return max(0, min(wanted, share, client_left, total_left))

    def charge(self, client: bytes, nbytes: int, *, last: bool = False, now: float | None = None) -> None:
        """Record a reply carrying ``nbytes`` of data to ``client``; ``last``: it ends a final
        effect's stream (see LAST_REPLY_TTL)."""
        if nbytes <= 0:
            return
        self._seq += 1
        reply = _Reply(client, nbytes, time.monotonic() if now is None else now, last)
        (self._last_replies if last else self._replies)[self._seq] = reply
        self._by_client.setdefault(client, []).append(self._seq)
        self._client_bytes[client] = self._client_bytes.get(client, 0) + nbytes
        self.inflight += nbytes

    def _release(self, seq: int) -> None:
        reply = self._replies.pop(seq, None) or self._last_replies.pop(seq)
        self.inflight -= reply.nbytes
        seqs = self._by_client[reply.client]
        seqs.remove(seq)
        if not seqs:
            del self._by_client[reply.client]
            del self._client_bytes[reply.client]
        else:
            self._client_bytes[reply.client] -= reply.nbytes

    def _expire(self, now: float) -> None:
        for replies, ttl in ((self._replies, self.ttl), (self._last_replies, LAST_REPLY_TTL)):
            while replies:
                seq, reply = next(iter(replies.items()))
                if now - reply.since < ttl:
                    break
                self._release(seq)
