"""The deciding core of the daemon: effect and worker state machines and the scheduler.

No sockets, files or processes here. The event loop (``server.py``) feeds it what happened
(a submit, a worker's report, the clock) and carries out what it decides (journal writes,
messages to workers), so every scheduling rule is testable without I/O.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from effectd.ipc.errors import InvalidState
from effectd.ipc.records import EffectRecord, effect_error, record_map
from effectd.ipc.schema import FINAL_STATES, EffectKind, EffectState

# Which states may follow which. A final state never changes again (exactly-once final state);
# a failed attempt that will be retried goes back to QUEUED without ever being reported final.
TRANSITIONS: dict[EffectState, frozenset[EffectState]] = {
    EffectState.QUEUED: frozenset({EffectState.RUNNING, EffectState.CANCELLED, EffectState.LOST}),
    EffectState.RUNNING: frozenset(
        {EffectState.SUCCEEDED, EffectState.FAILED, EffectState.CANCELLED, EffectState.TIMED_OUT,
         EffectState.LOST, EffectState.QUEUED}
    ),
    **{s: frozenset() for s in FINAL_STATES},
}

RETRYABLE_STATES = frozenset({EffectState.FAILED, EffectState.TIMED_OUT, EffectState.LOST})
MAX_RETRY_BACKOFF = 300.0
NEVER_STARTED = "never_started"
"""Reason of an attempt voided after a crash because it provably never started (it is not a
run: it does not use up a retry)."""


class WorkerState(str, Enum):
    STARTING = "starting"  # process spawned, no READY yet
    READY = "ready"        # connected, may take effects
    STOPPING = "stopping"  # told to stop (retire, recycle or shutdown); takes nothing new
    DEAD = "dead"


@dataclass
class Effect:
    """One effect's current record. ``to_record`` is what the journal stores and clients see."""

    id: str
    spec: dict[str, Any]
    submitted_at: float
    state: EffectState = EffectState.QUEUED
    attempt: int = 0
    reason: str | None = None
    worker: str | None = None
    pid: int | None = None
    create_time: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    leaked_processes: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    not_before: float = 0.0
    cancel_requested: str | None = None
    seq: int = 0

    @property
    def kind(self) -> EffectKind:
        kind = self.__dict__.get("_kind")
        if kind is None:
            kind = self.__dict__["_kind"] = EffectKind(self.spec["kind"])
        return kind

    @property
    def priority(self) -> int:
        return int(self.spec.get("priority", 0))

    @property
    def group(self) -> str | None:
        return self.spec.get("group")

    @property
    def after(self) -> list[str]:
        return list(self.spec.get("after") or [])

    def transition(self, new: EffectState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise InvalidState(f"effect {self.id} cannot go from {self.state.value} to {new.value}")
        self.state = new

    def to_record(self) -> dict[str, Any]:
        """The record (its shape: ipc/records.py) as the map the journal stores."""
        spec = self.spec
        return record_map(EffectRecord(
            id=self.id, kind=spec["kind"], name=spec.get("name"), labels=spec.get("labels") or {},
            state=self.state, reason=self.reason, attempt=self.attempt, attempts=self.attempts,
            submitted_at=self.submitted_at, started_at=self.started_at, finished_at=self.finished_at,
            worker=self.worker, pid=self.pid, create_time=self.create_time, exit_code=self.exit_code,
            signal=self.signal, result=self.result, error=effect_error(self.error), sizes=self.sizes,
            truncated=self.truncated, leaked_processes=self.leaked_processes, progress=self.progress,
            not_before=self.not_before, cancel_requested=self.cancel_requested, spec=spec,
        ))

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Effect:
        eff = cls(id=rec["id"], spec=rec["spec"], submitted_at=rec["submitted_at"])
        eff.state = EffectState(rec["state"])
        for name in ("attempt", "reason", "worker", "pid", "create_time", "started_at", "finished_at",
                     "exit_code", "signal", "result", "error", "progress", "cancel_requested"):
            setattr(eff, name, rec.get(name))
        eff.attempt = rec.get("attempt") or 0
        eff.sizes = rec.get("sizes") or {}
        eff.truncated = rec.get("truncated") or {}
        eff.leaked_processes = rec.get("leaked_processes") or 0
        eff.attempts = rec.get("attempts") or []
        eff.not_before = rec.get("not_before") or 0.0
        return eff


@dataclass
class Worker:
    id: str
    pid: int | None = None
    state: WorkerState = WorkerState.STARTING
    slots: int = 1
    effects: set[str] = field(default_factory=set)
    python_effect: str | None = None
    last_seen: float = 0.0
    idle_since: float = 0.0
    effects_done: int = 0
    rss: int = 0
    spawned_by_us: bool = True

    def free_slots(self) -> int:
        if self.state is not WorkerState.READY or self.python_effect is not None:
            return 0
        return self.slots - len(self.effects)

    def can_take(self, kind: EffectKind) -> bool:
        if kind is EffectKind.PYTHON:
            # Python effects run inside the worker and can only be stopped by ending the worker,
            # so they get a worker to themselves.
            return self.state is WorkerState.READY and not self.effects
        return self.free_slots() > 0


@dataclass(frozen=True)
class Limits:
    parallel: int = 8
    max_workers: int = 4
    min_workers: int = 1
    worker_slots: int = 32
    max_queued: int = 100_000
    group_limits: dict[str, int] = field(default_factory=dict)


DepLookup = Callable[[str], "EffectState | None"]


class Scheduler:
    """Holds every non-final effect and every worker; decides what runs where."""

    def __init__(self, limits: Limits, rng: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.monotonic = monotonic
        self.group_limits: dict[str, int] = dict(limits.group_limits)
        self.effects: dict[str, Effect] = {}
        self.workers: dict[str, Worker] = {}
        # Queued effects waiting out a retry backoff, by id: the loop sleeps until the earliest
        # without scanning every effect, and a started attempt no longer counts.
        self._backoff: dict[str, float] = {}
        self._seq = 0
        self._rng = rng or random.Random()

    # ---- effects --------------------------------------------------------------------------

    def add(self, eff: Effect) -> None:
        self._seq += 1
        eff.seq = self._seq
        self.effects[eff.id] = eff
        if eff.state is EffectState.QUEUED and eff.not_before:
            self._backoff[eff.id] = eff.not_before

    def reindex_backoffs(self) -> None:
        """Rebuild the backoff index after ``effects`` was edited directly (journal resync)."""
        self._backoff = {e.id: e.not_before for e in self.effects.values()
                         if e.state is EffectState.QUEUED and e.not_before}

    def next_retry_at(self) -> float | None:
        """Wall time at which the earliest backoff ends, if any effect waits one out."""
        return min(self._backoff.values(), default=None)

    def queued(self) -> list[Effect]:
        return [e for e in self.effects.values() if e.state is EffectState.QUEUED]

    def running(self) -> list[Effect]:
        return [e for e in self.effects.values() if e.state is EffectState.RUNNING]

    def queue_full(self, extra: int = 1) -> bool:
        return len(self.effects) + extra > self.limits.max_queued

    def dependency_verdict(self, eff: Effect, lookup: DepLookup) -> str:
        """'ready', 'wait', or 'failed' (a dependency ended other than succeeded)."""
        for dep in eff.after:
            state = self.effects[dep].state if dep in self.effects else lookup(dep)
            if state is None:
                # Deleted by retention: it was final; its outcome is no longer known.
                return "ready" if eff.spec.get("after_any_outcome") else "failed"
            if not state.final:
                return "wait"
            if state is not EffectState.SUCCEEDED and not eff.spec.get("after_any_outcome"):
                return "failed"
        return "ready"

    def plan(self, now: float, lookup: DepLookup) -> tuple[list[tuple[Effect, Worker]], list[Effect], int]:
        """Decide which queued effects start now and where.

        Returns (assignments, dependency failures to cancel, number of workers to spawn)."""
        assignments: list[tuple[Effect, Worker]] = []
        dep_failed: list[Effect] = []
        running = self.running()
        in_flight = sum(1 for e in running if e.kind is not EffectKind.SLEEP)
        per_group: dict[str, int] = {}
        for e in running:
            if e.group:
                per_group[e.group] = per_group.get(e.group, 0) + 1
        queued = self.queued()
        if not queued:
            return assignments, dep_failed, self._spawn_needed(0)
        if not any(w.free_slots() > 0 or w.can_take(EffectKind.PYTHON) for w in self.workers.values()):
            # No room anywhere: skip sorting the queue; only decide how many workers to start.
            python = sum(1 for e in queued if e.kind is EffectKind.PYTHON and e.not_before <= now)
            others = sum(1 for e in queued if e.kind is not EffectKind.PYTHON and e.not_before <= now)
            room = max(0, self.limits.parallel - in_flight)
            python = min(python, room)
            slots = max(1, self.limits.worker_slots)
            return assignments, dep_failed, self._spawn_needed(python + (min(others, room) + slots - 1) // slots)
        candidates = sorted(queued, key=lambda e: (-e.priority, e.seq))
        unplaced_python = 0
        unplaced_shell = 0
        for eff in candidates:
            # Sleeps are timers, not work: they do not count against --parallel.
            counts = eff.kind is not EffectKind.SLEEP
            if counts and in_flight >= self.limits.parallel:
                continue
            if eff.not_before > now:
                continue
            verdict = self.dependency_verdict(eff, lookup)
            if verdict == "failed":
                dep_failed.append(eff)
                continue
            if verdict == "wait":
                continue
            group = eff.group
            if group and group in self.group_limits and per_group.get(group, 0) >= self.group_limits[group]:
                continue  # skipped, not blocking: other groups keep flowing
            worker = self._place(eff.kind)
            if worker is None:
                if eff.kind is EffectKind.PYTHON:
                    unplaced_python += 1
                else:
                    unplaced_shell += 1
                in_flight += counts  # it would run if it had a worker: counts against --parallel
                continue
            assignments.append((eff, worker))
            worker.effects.add(eff.id)
            if eff.kind is EffectKind.PYTHON:
                worker.python_effect = eff.id
            in_flight += counts
            if group:
                per_group[group] = per_group.get(group, 0) + 1
        slots = max(1, self.limits.worker_slots)
        needed = unplaced_python + (unplaced_shell + slots - 1) // slots
        return assignments, dep_failed, self._spawn_needed(needed)

    def _place(self, kind: EffectKind) -> Worker | None:
        ready = [w for w in self.workers.values() if w.can_take(kind)]
        if not ready:
            return None
        if kind is EffectKind.PYTHON:
            return ready[0]
        # Pack shell/sleep effects into the busiest worker that has room, so spare workers stay
        # free for python effects and idle ones can retire.
        return max(ready, key=lambda w: (len(w.effects), w.id))

    def _spawn_needed(self, needed: int) -> int:
        """Workers to start: enough for the effects that found no room (a python effect needs a
        worker to itself; shell/sleep effects share one up to its slots), minus those starting."""
        live = [w for w in self.workers.values() if w.state in (WorkerState.STARTING, WorkerState.READY)]
        starting = sum(1 for w in live if w.state is WorkerState.STARTING)
        want = max(self.limits.min_workers - len(live), 0)
        if needed > starting:
            want = max(want, needed - starting)
        return max(0, min(want, self.limits.max_workers - len(live)))

    def start(self, eff: Effect, worker: Worker, now: float) -> None:
        self._backoff.pop(eff.id, None)
        eff.transition(EffectState.RUNNING)
        eff.attempt += 1
        eff.worker = worker.id
        eff.started_at = now
        eff.finished_at = None
        eff.pid = None
        eff.create_time = None
        eff.reason = None
        eff.leaked_processes = 0

    def release(self, eff: Effect, now: float) -> None:
        worker = self.workers.get(eff.worker or "")
        if worker is not None:
            worker.effects.discard(eff.id)
            if worker.python_effect == eff.id:
                worker.python_effect = None
            if not worker.effects:
                # Worker times are monotonic (compared in idle_workers_to_retire); ``now`` is
                # the wall clock of the effect's record.
                worker.idle_since = self.monotonic()
            worker.effects_done += 1

    def conclude(self, eff: Effect, state: EffectState, now: float, *, reason: str | None = None,
                 fields: dict[str, Any] | None = None, finished_at: float | None = None) -> bool:
        """End the current attempt. Returns True if the effect is now final, False if it was
        re-queued for a retry (with exponential backoff and jitter). ``finished_at`` is when the
        attempt really ended (the worker's clock, which may be long before ``now`` if it ended
        while no daemon ran); the retry backoff counts from ``now``."""
        fields = fields or {}
        ended = now if finished_at is None else finished_at
        self.release(eff, now)
        attempt_record = {"attempt": eff.attempt, "state": state.value, "reason": reason,
                          "started_at": eff.started_at, "finished_at": ended,
                          "exit_code": fields.get("exit_code"), "signal": fields.get("signal")}
        if eff.attempt:
            eff.attempts.append(attempt_record)
        for key, value in fields.items():
            setattr(eff, key, value)
        retries = int(eff.spec.get("retries", 0))
        ran = eff.attempt - sum(1 for a in eff.attempts if a.get("reason") == NEVER_STARTED)
        retry = (state in RETRYABLE_STATES and eff.cancel_requested is None and ran <= retries
                 and ran > 0)
        if retry:
            backoff = float(eff.spec.get("retry_backoff", 1.0)) * (2 ** (ran - 1))
            backoff = min(backoff, MAX_RETRY_BACKOFF)
            eff.not_before = now + backoff * (0.5 + self._rng.random() / 2)
            if eff.state is not EffectState.QUEUED:
                eff.transition(EffectState.QUEUED)
            eff.reason = reason
            eff.worker = None
            self._backoff[eff.id] = eff.not_before
            return False
        eff.transition(state)
        eff.reason = reason
        eff.finished_at = ended
        del self.effects[eff.id]
        self._backoff.pop(eff.id, None)
        return True

    def requeue_unstarted(self, eff: Effect, now: float) -> None:
        """Put a running effect whose attempt provably never started back in the queue, at
        once. The attempt number is not reused (its claim file is voided); the next start is
        attempt + 1, and the voided attempt is listed in ``attempts`` with reason NEVER_STARTED."""
        self.release(eff, now)
        eff.attempts.append({"attempt": eff.attempt, "state": EffectState.QUEUED.value, "reason": NEVER_STARTED,
                             "started_at": None, "finished_at": None, "exit_code": None, "signal": None})
        eff.transition(EffectState.QUEUED)
        eff.reason = NEVER_STARTED
        eff.worker = None
        eff.started_at = None
        eff.not_before = 0.0
        self._backoff.pop(eff.id, None)

    # ---- workers --------------------------------------------------------------------------

    def add_worker(self, worker: Worker) -> None:
        self.workers[worker.id] = worker

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state is not WorkerState.DEAD]

    def effects_of(self, worker: Worker) -> list[Effect]:
        return [self.effects[e] for e in worker.effects if e in self.effects]

    def idle_workers_to_retire(self, now: float, idle_timeout: float) -> list[Worker]:
        ready = [w for w in self.workers.values() if w.state is WorkerState.READY]
        surplus = len(ready) - self.limits.min_workers
        out: list[Worker] = []
        for w in sorted(ready, key=lambda w: w.idle_since):
            if surplus <= 0:
                break
            if not w.effects and now - w.idle_since >= idle_timeout:
                out.append(w)
                surplus -= 1
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.effects.values():
            out[e.state.value] = out.get(e.state.value, 0) + 1
        return out

