"""The supervision policies of the daemon, as pure decisions (no sockets, files or processes).

The event loop (``server.py``) asks these objects what to do and carries it out: when the next
worker may start after crashes, how an effect ends when nobody can report it, which idle worker
retires, which worker is declared lost, what happens to a recovered effect nobody claims. Every
clock is injectable, so each rule is unit-tested in milliseconds (tests/test_policy.py).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from effectd.daemon.core import Worker, WorkerState
from effectd.ipc.schema import EffectState

Clock = Callable[[], float]

# ---- crash backoff -------------------------------------------------------------------------

CRASH_WINDOW = 60.0
"""Seconds over which worker crashes are counted."""
CRASH_LOOP_THRESHOLD = 3
"""Crashes within CRASH_WINDOW tolerated before the next spawn is delayed."""
FIRST_SPAWN_BACKOFF = 0.2
"""Delay after the first crash past the threshold; doubles with each further one."""
SPAWN_BACKOFF_MAX = 60.0


class CrashBackoff:
    """Crash-loop protection: more than CRASH_LOOP_THRESHOLD worker crashes within CRASH_WINDOW
    seconds delay the next spawn exponentially, so a worker that dies at start (a broken
    interpreter, a full disk) does not fork in a tight loop. Reported by ``hello``."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._times: collections.deque[float] = collections.deque()
        self.failures = 0
        """Crashes since the daemon started."""
        self.spawn_not_before = 0.0

    def _prune(self, now: float) -> None:
        while self._times and now - self._times[0] > CRASH_WINDOW:
            self._times.popleft()

    def recent(self) -> int:
        """Crashes within the last CRASH_WINDOW seconds."""
        self._prune(self._clock())
        return len(self._times)

    def crashed(self) -> float:
        """Count a crash; returns the spawn delay it causes (0.0: none)."""
        now = self._clock()
        self._times.append(now)
        self._prune(now)
        self.failures += 1
        recent = len(self._times)
        if recent <= CRASH_LOOP_THRESHOLD:
            return 0.0
        backoff = min(SPAWN_BACKOFF_MAX, FIRST_SPAWN_BACKOFF * 2.0 ** (recent - CRASH_LOOP_THRESHOLD - 1))
        self.spawn_not_before = now + backoff
        return backoff

    def may_spawn(self, now: float) -> bool:
        return now >= self.spawn_not_before

    def remaining(self) -> float:
        """Seconds until a worker may be spawned again."""
        return max(0.0, self.spawn_not_before - self._clock())


# ---- what workers report --------------------------------------------------------------------


def reported_time(value: Any, not_before: float, now: float) -> float | None:
    """A wall time a worker reported, if it is plausible: finite, not before ``not_before`` and
    not after ``now`` (same machine, same clock; anything else is a bug or garbage)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if value < not_before or value > now + 1.0:
        return None
    return float(value)


# ---- how an effect ends when its reporter is gone ------------------------------------------


class Loss(str, Enum):
    """Why an effect ends without its worker's report."""

    WORKER_LOST = "worker_lost"
    """Its worker died or went silent."""
    DAEMON_STOPPED = "daemon_stopped"
    """Shutdown interrupted it and its worker did not report within kill grace."""
    DAEMON_CRASHED = "daemon_crashed"
    """Recovered after a crash, claimed by no worker within the adopt grace, and may have run."""


def loss_outcome(loss: Loss, cancel_requested: str | None) -> tuple[EffectState, str]:
    """The final state and reason of an effect killed and concluded by the daemon itself.

    A cancel the daemon asked for wins over the loss (the effect was going to end anyway),
    except a shutdown's: an effect interrupted because the daemon stopped did not fail and was
    not cancelled by anyone, it was lost (``daemon_stopped``)."""
    if loss is not Loss.WORKER_LOST:
        return EffectState.LOST, loss.value
    if cancel_requested == "daemon_stopped":
        return EffectState.LOST, "daemon_stopped"
    if cancel_requested:
        return EffectState.CANCELLED, cancel_requested
    return EffectState.FAILED, Loss.WORKER_LOST.value


def reported_outcome(state: EffectState, reason: str | None,
                     cancel_requested: str | None) -> tuple[EffectState, str | None]:
    """The final state of a worker's report: a cancel reports the reason it was asked with, and
    one caused by the daemon's shutdown is a loss (``daemon_stopped``), as in loss_outcome."""
    if state is EffectState.CANCELLED and cancel_requested == "daemon_stopped":
        return EffectState.LOST, "daemon_stopped"
    if state is EffectState.CANCELLED and cancel_requested:
        return state, cancel_requested
    return state, reason


# ---- adoption after a crash ----------------------------------------------------------------


class Unclaimed(str, Enum):
    """What becomes of a recovered running effect no worker claimed within the adopt grace."""

    REQUEUE = "requeue"
    """No evidence it ever started: it runs again (at most once; it uses up no retry)."""
    LOSE = "lose"
    """It may have started: its processes are killed and it is concluded lost (daemon_crashed)."""


class Adoption:
    """Deadlines of recovered running effects: their worker must reconnect and report them
    within ``grace`` seconds, or they are judged by :meth:`verdict`."""

    def __init__(self, grace: float, clock: Clock = time.monotonic) -> None:
        self.grace = grace
        self._clock = clock
        self._deadlines: dict[str, float] = {}

    def __contains__(self, effect_id: object) -> bool:
        return effect_id in self._deadlines

    def __len__(self) -> int:
        return len(self._deadlines)

    def expect(self, effect_id: str) -> None:
        self._deadlines[effect_id] = self._clock() + self.grace

    def settled(self, effect_id: str) -> None:
        """Claimed by a worker, concluded, or being killed: no deadline any more."""
        self._deadlines.pop(effect_id, None)

    def expired(self, now: float) -> list[str]:
        """Effects whose grace ended; they leave the table."""
        due = [eid for eid, deadline in self._deadlines.items() if now >= deadline]
        for eid in due:
            del self._deadlines[eid]
        return due

    @staticmethod
    def verdict(never_started: bool) -> Unclaimed:
        return Unclaimed.REQUEUE if never_started else Unclaimed.LOSE


# ---- worker liveness -----------------------------------------------------------------------

WORKER_START_TIMEOUT = 30.0
"""Seconds a spawned worker may take to connect and report ready."""


def silence_verdict(worker: Worker, silent: float, liveness: float) -> str | None:
    """Why a worker silent for ``silent`` seconds of listening time (liveness.HearingClock) is
    lost, or None. ``liveness`` is the window of a connected worker (heartbeats x liveness)."""
    if worker.state is WorkerState.STARTING and silent > WORKER_START_TIMEOUT:
        return "never became ready"
    if worker.state in (WorkerState.READY, WorkerState.STOPPING) and silent > liveness:
        return f"silent for {silent:.1f}s"
    return None


# ---- recycling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecyclePolicy:
    """When an idle worker is retired: past ``idle_timeout`` (above min_workers, see
    Scheduler.idle_workers_to_retire), after ``max_effects`` effects, or past ``max_rss`` bytes
    (0: never). Only workers that hold no effect are retired: nothing running is disturbed."""

    idle_timeout: float
    max_effects: int = 0
    max_rss: int = 0

    def retire_reason(self, worker: Worker, rss: Callable[[int], int] | None) -> str | None:
        """Why this worker retires now (``rss``: how to read a pid's RSS, None to skip that
        check this turn), or None."""
        if worker.state is not WorkerState.READY or worker.effects:
            return None
        if self.max_effects and worker.effects_done >= self.max_effects:
            return "max_effects_per_worker"
        if rss is not None and self.max_rss and worker.pid and rss(worker.pid) > self.max_rss:
            return "max_worker_rss"
        return None

    def to_retire(self, idle: Iterable[Worker], workers: Iterable[Worker],
                  rss: Callable[[int], int] | None) -> list[tuple[Worker, str]]:
        """Every worker to retire now and why: the ``idle`` surplus first, then the others."""
        out = [(w, "idle") for w in idle]
        chosen = {w.id for w, _ in out}
        for worker in workers:
            if worker.id in chosen:
                continue
            why = self.retire_reason(worker, rss)
            if why is not None:
                out.append((worker, why))
        return out


class Throttle:
    """True at most once per ``interval`` seconds (e.g. reading /proc for every idle worker's
    RSS once per half heartbeat, not on every loop turn)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = 0.0

    def due(self, now: float) -> bool:
        if now - self._last < self.interval:
            return False
        self._last = now
        return True
