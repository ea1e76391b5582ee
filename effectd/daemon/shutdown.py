"""The phases of a shutdown, as a pure state machine with an injectable clock.

A drain lets running effects finish until ``drain_timeout``; then workers are asked to cancel
what still runs (reason ``daemon_stopped``, concluded ``lost``); after ``kill_grace`` plus an
allowance for their report, the daemon kills the trees itself; once nothing runs, workers are
told to stop and the loop ends when they are gone. Whatever happens, the loop stops
SHUTDOWN_OVERRUN seconds past drain + kill grace (e.g. when the journal cannot be written and
nothing can be concluded). ``server.py`` carries out the actions :meth:`Shutdown.step` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

SHUTDOWN_OVERRUN = 15.0
"""Seconds past drain + kill grace after which shutdown stops without concluding everything."""
REPORT_ALLOWANCE = 5.0
"""Seconds beyond kill grace a worker gets to report the effects it was asked to cancel."""
WORKER_EXIT_WAIT = 10.0
"""Seconds past the drain deadline to wait for workers told to stop (the rest are killed by close)."""


class Phase(str, Enum):
    SERVING = "serving"
    DRAINING = "draining"          # running effects may finish until the drain deadline
    INTERRUPTING = "interrupting"  # workers were asked to cancel what still runs
    KILLING = "killing"            # workers did not report in time: the daemon kills the trees
    RETIRING = "retiring"          # nothing runs: workers are told to stop
    STOPPED = "stopped"            # the loop may end
    OVERRUN = "overrun"            # stopped without concluding everything


class DrainAction(str, Enum):
    INTERRUPT = "interrupt"
    """Ask the workers to cancel every running effect (reason daemon_stopped)."""
    KILL = "kill"
    """Kill every running effect's tree here and conclude it lost (repeated: idempotent)."""
    RETIRE_WORKERS = "retire_workers"
    """Tell every live worker to stop (repeated: idempotent)."""
    STOP = "stop"
    """End the loop."""
    ABANDON = "abandon"
    """Overrun: tell workers to stop and end the loop without concluding what still runs."""


class Shutdown:
    def __init__(self, drain_timeout: float, kill_grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.drain_timeout = drain_timeout
        self.kill_grace = kill_grace
        self._clock = clock
        self.phase = Phase.SERVING
        self.deadline: float | None = None
        """End of the drain: running effects are interrupted from then on."""
        self.interrupting_since: float | None = None
        self.stop_now = False

    @property
    def draining(self) -> bool:
        return self.phase is not Phase.SERVING

    def begin(self, drain: bool) -> float | None:
        """Start shutting down (with a drain, or at once). A second request without drain
        makes it immediate. Returns the drain deadline when this call started the shutdown
        (parked waits must be answered by then), else None."""
        now = self._clock()
        started = None
        if self.draining and not drain:
            self.stop_now = True
        if not self.draining:
            self.phase = Phase.DRAINING
            self.deadline = started = now + (self.drain_timeout if drain else 0.0)
        if self.stop_now:
            self.deadline = now
        return started

    def step(self, now: float, running: bool, killing: bool, workers_left: bool) -> list[DrainAction]:
        """What to do this turn. ``running``: effects are still running; ``killing``: trees
        are being killed before their effects are concluded; ``workers_left``: worker processes
        (spawned or adopted) have not exited yet."""
        if self.deadline is None or self.phase in (Phase.STOPPED, Phase.OVERRUN, Phase.SERVING):
            return []
        if now > self.deadline + self.kill_grace + SHUTDOWN_OVERRUN:
            self.phase = Phase.OVERRUN
            return [DrainAction.ABANDON]
        if running and self.interrupting_since is None:
            if now < self.deadline:
                return []
            self.interrupting_since = now
            self.phase = Phase.INTERRUPTING
            return [DrainAction.INTERRUPT]
        if running and self.interrupting_since is not None:
            if now - self.interrupting_since < self.kill_grace + REPORT_ALLOWANCE:
                return []
            self.phase = Phase.KILLING
            return [DrainAction.KILL]
        if killing:
            return []
        self.phase = Phase.RETIRING
        if not workers_left or (self.interrupting_since is None and now - self.deadline > WORKER_EXIT_WAIT):
            self.phase = Phase.STOPPED
            return [DrainAction.RETIRE_WORKERS, DrainAction.STOP]
        return [DrainAction.RETIRE_WORKERS]
