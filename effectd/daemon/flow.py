"""Flow control for ``read_output``: the daemon's memory stays bounded whatever the number of readers.

A ``read_output`` reply sits in the control ROUTER's pipe (daemon memory) until its client reads
it. ZeroMQ does not tell the daemon when that happens, so the daemon keeps a ledger of the bytes
it has sent and not yet seen acknowledged. One entry per reader, i.e. per (client identity, effect,
stream): readers read sequentially, so a reader's next ``read_output`` acknowledges its previous
reply (and a client that vanished or reconnected releases its entries after ``CREDIT_TTL``).

A new read is served with at most:

* its fair share of the total budget (``TOTAL_INFLIGHT`` / number of readers in flight), at
  least ``MIN_SLICE`` (protocol: ``data`` may be shorter than ``max_bytes``);
* what the client identity has left of ``PER_CLIENT_INFLIGHT``;
* what is left of ``TOTAL_INFLIGHT``.

When less than ``MIN_SLICE`` is left (of the total or of the client's share) the read is answered
``busy`` and the client retries after a short backoff. So the bytes of unacknowledged
``read_output`` replies never exceed ``TOTAL_INFLIGHT`` (docs/architecture.md, "Many followers").
"""

from __future__ import annotations

import collections
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
CREDIT_TTL = 10.0
"""Seconds after which an unacknowledged reply no longer counts (its client went away, or reads
no more of that stream)."""

ReaderKey = tuple[bytes, str, str]


@dataclass
class _Entry:
    nbytes: int
    since: float


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
        self._entries: collections.OrderedDict[ReaderKey, _Entry] = collections.OrderedDict()
        self._by_client: dict[bytes, int] = {}
        self.busy_answers = 0

    def grant(self, key: ReaderKey, wanted: int, now: float | None = None) -> int:
        """Bytes this read may return (≤ ``wanted``); acknowledges the reader's previous reply.
        Raises Busy when the budget is used up by replies other readers have not read yet."""
        now = time.monotonic() if now is None else now
        self._release(key)
        self._expire(now)
        client_left = self.per_client - self._by_client.get(key[0], 0)
        total_left = self.total - self.inflight
        if min(client_left, total_left) < min(self.min_slice, wanted):
            self.busy_answers += 1
            raise Busy(f"{self.inflight} bytes of read_output replies are not read yet by "
                       f"{len(self._entries)} readers; retry shortly")
        share = max(self.min_slice, self.total // (len(self._entries) + 1))
        return max(0, min(wanted, share, client_left, total_left))

    def charge(self, key: ReaderKey, nbytes: int, now: float | None = None) -> None:
        """Record a reply of ``nbytes`` data sent to the reader (0: nothing to acknowledge)."""
        if nbytes <= 0:
            return
        now = time.monotonic() if now is None else now
        self._entries[key] = _Entry(nbytes, now)
        self._entries.move_to_end(key)
        self._by_client[key[0]] = self._by_client.get(key[0], 0) + nbytes
        self.inflight += nbytes

    def _release(self, key: ReaderKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.inflight -= entry.nbytes
        left = self._by_client[key[0]] - entry.nbytes
        if left > 0:
            self._by_client[key[0]] = left
        else:
            del self._by_client[key[0]]

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.since < self.ttl:
                return
            self._release(key)
