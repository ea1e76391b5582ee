"""How long a peer has been silent, counting only the time we were able to hear it.

The daemon judges its workers, and each worker its daemon, by silence: no message for
``HEARTBEAT_LIVENESS`` heartbeats means the peer is gone. Wall time is the wrong measure when
*we* were the one not listening: a SIGSTOP, a paused VM, a loop turn blocked in a slow fsync.
Messages the peer sent meanwhile sit unread in our socket (or in the kernel buffer, if our zmq
I/O thread was stopped too), so blaming the peer would kill healthy work for our own stall.

:class:`HearingClock` is a monotonic clock that does not advance while we are deaf. Each loop
turn reports how long it asked to poll; any part of the interval between two turns beyond that
poll timeout plus an allowance (:data:`TURN_ALLOWANCE`, at most one heartbeat) is counted as
deafness and taken out of the clock.
Peers' "last heard" times are kept on this clock, so a stall of any length costs them nothing,
while a peer that stays silent while we listen is still detected after the usual window.

The base clock is ``CLOCK_MONOTONIC`` (``time.monotonic``): it does not count system suspend,
when every process (daemon, workers, effects) is frozen together and nobody was silent. A
clock that counts suspend (``CLOCK_BOOTTIME``) would report suspend as one long turn, which the
deafness rule above absorbs as well; a paused VM whose guest clock jumps on resume is absorbed
the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

TURN_ALLOWANCE = 0.5
"""Seconds a loop turn may take beyond its poll timeout and still count as listening time.

Normal turns take milliseconds; a longer one is either a stall of this process (counted as
deafness) or heavy work, during which zmq's I/O thread still queues what peers send (read
before judging them). Deafness extends every peer's window, so this bounds how much a busy
loop can delay the detection of a hung peer: by at most the busy time beyond this allowance."""


class HearingClock:
    """A monotonic clock that stops while this process could not listen (see module doc)."""

    def __init__(self, allowance: float = TURN_ALLOWANCE, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowance = allowance
        self._clock = clock
        self._last_turn = clock()
        self.deaf_total = 0.0
        """Seconds of deafness since start (reported by the daemon's hello)."""
        self.worst_overrun = 0.0
        """Longest interval between two turns beyond their poll timeout (a stall or a long turn)."""

    def now(self) -> float:
        return self._clock() - self.deaf_total

    def turn(self, polled: float) -> float:
        """Call once per loop turn, right after the poll that asked to wait ``polled`` seconds.
        Returns the deafness found since the previous turn (0.0 for a healthy turn)."""
        now = self._clock()
        gap = now - self._last_turn
        self._last_turn = now
        overrun = max(0.0, gap - polled)
        self.worst_overrun = max(self.worst_overrun, overrun)
        deaf = max(0.0, overrun - self.allowance)
        self.deaf_total += deaf
        return deaf
