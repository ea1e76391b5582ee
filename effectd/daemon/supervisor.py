"""Supervision of effects and workers: carries out what the core and the policies decide.

The loop (``server.py``) hands it what workers send and calls it once per turn; it applies the
scheduler's plan (core.py) and the supervision policies (policy.py) and stages the journal
writes and messages that follow (sent by the loop after the commit, outbox.py). It owns what
only supervision needs: pending kills, adoption deadlines, crash backoff, recycling.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from effectd.daemon.config import DaemonConfig
from effectd.daemon.core import NEVER_STARTED, Effect, Scheduler, Worker, WorkerState
from effectd.daemon.liveness import HearingClock
from effectd.daemon.outbox import Outbox
from effectd.daemon.policy import (
    CRASH_WINDOW,
    Adoption,
    CrashBackoff,
    Loss,
    RecyclePolicy,
    Throttle,
    Unclaimed,
    loss_outcome,
    reported_outcome,
    reported_time,
    silence_verdict,
)
from effectd.daemon.pool import WorkerProcesses
from effectd.daemon.proctree import ProcessIdentity, TreeKill, effect_processes
from effectd.daemon.shutdown import Shutdown
from effectd.daemon.waits import WaitTable
from effectd.ipc import messages
from effectd.ipc.constants import HEARTBEAT_LIVENESS
from effectd.ipc.errors import EffectdError
from effectd.ipc.schema import EffectKind, EffectState
from effectd.journal import Journal, OutputStore

log = logging.getLogger("effectd.daemon")


@dataclass
class PendingKill:
    """An effect whose process tree is being killed before it is concluded."""

    effect_id: str
    kill: TreeKill
    state: EffectState
    reason: str


class Supervisor:
    """Effects and workers of one daemon; given its collaborators explicitly, not the Daemon."""

    def __init__(self, config: DaemonConfig, sched: Scheduler, journal: Journal, outputs: OutputStore,
                 outbox: Outbox, waits: WaitTable, procs: WorkerProcesses, hearing: HearingClock,
                 shutdown: Shutdown, instance: str, state_of: Callable[[str], EffectState | None]) -> None:
        self.config = config
        self.sched = sched
        self.journal = journal
        self.outputs = outputs
        self.outbox = outbox
        self.waits = waits
        self.procs = procs
        self.hearing = hearing
        """Workers' ``last_seen`` is on this clock: time the loop could not listen is not silence."""
        self.shutdown = shutdown
        self.instance = instance
        self.state_of = state_of
        """An effect's state, in memory or in the journal (dependencies of queued effects)."""
        self.pending_kills: dict[str, PendingKill] = {}
        self.final_markers: list[str] = []
        """Effects whose output dir is marked final once their final state is committed."""
        self.adoption = Adoption(config.adopt_grace)
        self.crashes = CrashBackoff()
        self.recycling = RecyclePolicy(config.worker_idle_timeout, config.max_effects_per_worker,
                                       config.max_worker_rss)
        # Reading /proc for every idle worker's RSS once per half heartbeat is enough.
        self.rss_checks = Throttle(config.heartbeat / 2)
        self.heartbeats = Throttle(config.heartbeat)
        self.conclude_not_before = 0.0
        """After a failed commit, own kills are concluded again from then on (server.py)."""

    # ---- effects --------------------------------------------------------------------------

    def conclude(self, eff: Effect, state: EffectState, *, reason: str | None = None,
                 fields: dict[str, Any] | None = None, finished_at: float | None = None) -> None:
        final = self.sched.conclude(eff, state, time.time(), reason=reason, fields=fields,
                                    finished_at=finished_at)
        self.adoption.settled(eff.id)
        if final:
            # The one place a final state is written; the journal refuses a second one.
            if not self.journal.put_final(eff.to_record()):
                log.error("refused to record effect %s as %s: the journal already holds a final state "
                          "for it (a final state never changes)", eff.id, eff.state.value)
                self.waits.effect_final(eff.id)
                return
            self.final_markers.append(eff.id)
            self.waits.effect_final(eff.id)
            self.outbox.publish_event(eff.id, "finished", state=eff.state.value, attempt=eff.attempt,
                                      sizes=self.outputs.sizes(eff.id))
        else:
            self.journal.put_effect(eff.to_record(), "retry_scheduled",
                                    {"after_state": state.value, "not_before": eff.not_before})

    def cancel_effect(self, eff: Effect, reason: str) -> None:
        if eff.state is EffectState.QUEUED:
            eff.cancel_requested = reason
            self.conclude(eff, EffectState.CANCELLED, reason=reason)
        elif eff.state is EffectState.RUNNING and eff.cancel_requested is None:
            eff.cancel_requested = reason
            self.journal.put_effect(eff.to_record(), "cancel_requested", {"reason": reason})
            if eff.id in self.adoption:  # no worker to ask (yet): cancelled by the kill itself
                # The same outcome a worker's report of that cancel would have (a shutdown's is lost).
                state, why = reported_outcome(EffectState.CANCELLED, reason, eff.cancel_requested)
                self.kill_then_conclude(eff, state, why or reason)
            elif eff.worker:
                self.outbox.to_worker(eff.worker, messages.Cancel(id=eff.id, reason=reason), durable=False)

    def unclaimed_after_crash(self, eff: Effect) -> None:
        """No worker claimed a recovered running effect within the adopt grace. At most once:
        only an attempt with no evidence of ever starting (no journaled start, its claim file
        voided by us before any worker made it, no process carrying its marker) runs again;
        anything that may have started is killed and concluded lost."""
        never_started = (eff.pid is None and self.outputs.void_attempt(eff.id, eff.attempt)
                         and not effect_processes(eff.id))
        if Adoption.verdict(never_started) is Unclaimed.REQUEUE:
            log.info("effect %s attempt %d never started before the crash: queued again", eff.id, eff.attempt)
            attempt = eff.attempt
            self.sched.requeue_unstarted(eff, time.time())
            self.journal.put_effect(eff.to_record(), "requeued", {"attempt": attempt, "reason": NEVER_STARTED})
            return
        log.warning("effect %s was not re-adopted within %.0fs", eff.id, self.config.adopt_grace)
        self.kill_then_conclude(eff, *loss_outcome(Loss.DAEMON_CRASHED, eff.cancel_requested))

    def kill_then_conclude(self, eff: Effect, state: EffectState, reason: str) -> None:
        """For effects no live worker supervises: kill their tree here, conclude when it is gone."""
        if eff.id in self.pending_kills:
            return
        self.adoption.settled(eff.id)
        root = ProcessIdentity(eff.pid, eff.create_time) if eff.pid and eff.create_time else None
        kill = TreeKill(eff.id, root, grace=self.config.kill_grace)
        kill.start()
        self.pending_kills[eff.id] = PendingKill(eff.id, kill, state, reason)

    # ---- workers --------------------------------------------------------------------------

    def on_worker(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        wid = frames[0].decode(errors="replace")
        try:
            msg = messages.decode_worker_message(frames[1])
        except EffectdError as exc:
            log.warning("bad message from worker %s: %s", wid, exc)
            return
        worker = self.sched.workers.get(wid)
        if isinstance(msg, messages.Ready):
            self.worker_ready(wid, msg)
            return
        if worker is None or worker.state is WorkerState.DEAD:
            self.outbox.send_worker(frames[0], messages.encode(messages.Reset()))
            return
        worker.last_seen = self.hearing.now()
        if isinstance(msg, messages.Heartbeat):
            worker.effects_done = msg.effects_done or worker.effects_done
            worker.rss = msg.rss or worker.rss
        elif isinstance(msg, messages.Started):
            eff = self.sched.effects.get(msg.id)
            if eff is not None and eff.attempt == msg.attempt and eff.state is EffectState.RUNNING:
                if eff.id in self.adoption and eff.id not in self.pending_kills:
                    # An assignment of the previous daemon that this worker read only now: it
                    # claims the effect, which is as good as re-adoption.
                    self.claimed_by(eff, worker)
                eff.pid, eff.create_time = msg.pid, msg.create_time
                eff.started_at = reported_time(msg.started_at, eff.submitted_at, time.time()) or eff.started_at
                self.journal.put_effect(eff.to_record(), "started", {"pid": eff.pid})
        elif isinstance(msg, messages.Finished):
            self.effect_finished(wid, msg)
        elif isinstance(msg, messages.Progress):
            eff = self.sched.effects.get(msg.id)
            if eff is not None:
                eff.progress = {"fraction": msg.fraction, "message": msg.message, "time": time.time()}
                self.outbox.publish_event(eff.id, "progress", fraction=msg.fraction, message=msg.message,
                                          time=time.time())
        elif isinstance(msg, messages.Bye):
            worker.state = WorkerState.STOPPING  # takes no new work; reaped when it exits

    def worker_ready(self, wid: str, msg: messages.Ready) -> None:
        worker = self.sched.workers.get(wid)
        if worker is None or worker.state is WorkerState.DEAD:
            worker = Worker(id=wid, pid=msg.pid, spawned_by_us=wid in self.procs.children)
            if not worker.spawned_by_us:
                self.procs.adopted_pids[wid] = msg.pid
                log.info("worker %s (pid %d) of an earlier daemon reconnected", wid, msg.pid)
            self.sched.add_worker(worker)
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.READY
        worker.pid = msg.pid
        worker.slots = msg.slots
        worker.last_seen = self.hearing.now()
        worker.idle_since = worker.idle_since or time.monotonic()
        worker.effects_done = msg.effects_done or 0
        for report in msg.finished or []:
            with contextlib.suppress(EffectdError):
                self.effect_finished(wid, messages.check_report(report, messages.Finished))
        for report in msg.running or []:
            try:
                rep: messages.RunningReport = messages.check_report(report, messages.RunningReport)
            except EffectdError:
                continue
            eff = self.sched.effects.get(rep.id)
            if (eff is not None and eff.state is EffectState.RUNNING and eff.attempt == rep.attempt
                    and eff.id not in self.pending_kills):
                if eff.id in self.adoption or eff.worker != wid:
                    eff.pid = rep.pid or eff.pid
                    eff.create_time = rep.create_time or eff.create_time
                    eff.started_at = reported_time(rep.started_at, eff.submitted_at, time.time()) or eff.started_at
                    self.claimed_by(eff, worker)
                else:
                    worker.effects.add(eff.id)
                    if eff.kind is EffectKind.PYTHON:
                        worker.python_effect = eff.id
            else:
                # Not ours to run (already final, or unknown to this journal): stop it.
                self.outbox.to_worker(wid, messages.Cancel(id=rep.id, reason="not_adopted"), durable=False)
        self.outbox.send_worker(wid.encode(), messages.encode(messages.Welcome(instance=self.instance)))

    def claimed_by(self, eff: Effect, worker: Worker) -> None:
        """Re-adopt a recovered effect on the worker that reports running it."""
        log.info("re-adopted effect %s on worker %s", eff.id, worker.id)
        self.adoption.settled(eff.id)
        eff.worker = worker.id
        worker.effects.add(eff.id)
        if eff.kind is EffectKind.PYTHON:
            worker.python_effect = eff.id
        self.journal.put_effect(eff.to_record(), "adopted", {"worker": worker.id})

    def effect_finished(self, wid: str, rep: messages.Finished) -> None:
        eff = self.sched.effects.get(rep.id)
        if eff is not None and eff.state is EffectState.RUNNING and eff.attempt == rep.attempt:
            state, reason = reported_outcome(EffectState(rep.state), rep.reason, eff.cancel_requested)
            fields = {"exit_code": rep.exit_code, "signal": rep.signal, "result": rep.result, "error": rep.error,
                      "sizes": rep.sizes or {}, "truncated": rep.truncated or {},
                      "leaked_processes": rep.leaked_processes or 0}
            self.pending_kills.pop(eff.id, None)
            # The worker's own clock says when it ran: a report delivered after a daemon restart
            # must not stretch the effect to the time of re-adoption.
            wall = time.time()
            eff.started_at = reported_time(rep.started_at, eff.submitted_at, wall) or eff.started_at
            self.conclude(eff, state, reason=reason, fields=fields,
                          finished_at=reported_time(rep.finished_at, eff.started_at or eff.submitted_at, wall))
        # Duplicates and late reports never change a final state; always acknowledge them so the
        # worker forgets the report.
        self.outbox.to_worker(wid, messages.Ack(id=rep.id, attempt=rep.attempt))

    def worker_lost(self, worker: Worker, why: str) -> None:
        if worker.state is WorkerState.DEAD:
            return
        was_stopping = worker.state is WorkerState.STOPPING
        worker.state = WorkerState.DEAD
        self.procs.kill(worker.id, worker.pid)
        self.procs.adopted_pids.pop(worker.id, None)
        effects = self.sched.effects_of(worker)
        if effects or not was_stopping:
            log.warning("worker %s (pid %s) lost: %s; %d effect(s) affected", worker.id, worker.pid, why,
                        len(effects))
        if not was_stopping and not self.shutdown.draining:
            backoff = self.crashes.crashed()
            if backoff:
                log.warning("%d worker crashes in %.0fs: next worker start delayed %.1fs", self.crashes.recent(),
                            CRASH_WINDOW, backoff)
        for eff in effects:
            self.kill_then_conclude(eff, *loss_outcome(Loss.WORKER_LOST, eff.cancel_requested))
        worker.effects.clear()
        worker.python_effect = None
        del self.sched.workers[worker.id]

    def ready_workers(self) -> int:
        return sum(1 for w in self.sched.workers.values() if w.state is WorkerState.READY)

    def schedule(self, wall: float, now: float) -> None:
        assignments, dep_failed, spawn = self.sched.plan(wall, self.state_of)
        for eff in dep_failed:
            self.conclude(eff, EffectState.CANCELLED, reason="dependency_failed")
        for eff, worker in assignments:
            with contextlib.suppress(OSError):  # if it fails, the worker reports spawn_failed
                self.outputs.prepare(eff.id)
            self.sched.start(eff, worker, wall)
            self.journal.put_effect(eff.to_record(), "running", {"worker": worker.id, "attempt": eff.attempt})
            self.outbox.to_worker(worker.id, messages.Assign(id=eff.id, attempt=eff.attempt, spec=eff.spec))
            self.outbox.publish_event(eff.id, "started", state="running", attempt=eff.attempt, time=wall)
        if spawn and self.crashes.may_spawn(now):
            for _ in range(spawn):
                wid, pid = self.procs.spawn()
                self.sched.add_worker(Worker(id=wid, pid=pid, last_seen=self.hearing.now()))

    def maintain_pool(self, now: float) -> None:
        if self.shutdown.draining:
            return
        rss = self.procs.rss if self.rss_checks.due(now) else None
        idle = self.sched.idle_workers_to_retire(now, self.recycling.idle_timeout)
        for worker, why in self.recycling.to_retire(idle, list(self.sched.workers.values()), rss):
            self.retire(worker, why)

    def retire(self, worker: Worker, why: str) -> None:
        log.info("retiring worker %s (%s)", worker.id, why)
        worker.state = WorkerState.STOPPING
        self.outbox.to_worker(worker.id, messages.Stop(reason=why), durable=False)

    def retire_all(self) -> None:
        for w in [w for w in self.sched.workers.values() if w.state is not WorkerState.DEAD]:
            if w.state is WorkerState.STARTING:
                # Not connected yet, so a 'stop' message cannot reach it; it holds no effects.
                self.procs.kill(w.id, w.pid)
                w.state = WorkerState.STOPPING
            elif w.state is not WorkerState.STOPPING:
                self.retire(w, "daemon_stopped")

    # ---- once per loop turn ---------------------------------------------------------------

    def reap(self) -> None:
        for wid, status in self.procs.reap():
            worker = self.sched.workers.get(wid)
            if worker is not None:
                self.worker_lost(worker, f"exited with status {status}")

    def judge_liveness(self) -> None:
        """Declare lost the workers silent for ``HEARTBEAT_LIVENESS`` heartbeats of listening
        time (the loop has read what they sent first; liveness.py)."""
        heard = self.hearing.now()
        liveness = self.config.heartbeat * HEARTBEAT_LIVENESS
        for worker in list(self.sched.workers.values()):
            why = silence_verdict(worker, heard - worker.last_seen, liveness)
            if why is not None:
                self.worker_lost(worker, why)

    def send_heartbeats(self, now: float) -> None:
        if self.heartbeats.due(now):
            for worker in self.sched.workers.values():
                if worker.state in (WorkerState.READY, WorkerState.STOPPING):
                    self.outbox.send_worker(worker.id.encode(), messages.encode(messages.DaemonHeartbeat()))

    def judge_unclaimed(self, now: float) -> None:
        for eid in self.adoption.expired(now):
            eff = self.sched.effects.get(eid)
            if eff is not None:
                self.unclaimed_after_crash(eff)

    def conclude_killed(self, now: float) -> None:
        """Conclude the effects whose trees are gone."""
        for eid, pk in list(self.pending_kills.items()):
            if now >= self.conclude_not_before and pk.kill.poll(now):
                del self.pending_kills[eid]
                eff = self.sched.effects.get(eid)
                if eff is not None and eff.state is EffectState.RUNNING:
                    self.conclude(eff, pk.state, reason=pk.reason, fields={"sizes": self.outputs.sizes(eid)})

    def supervise_restored(self, eff: Effect) -> None:
        """An effect restored from the journal after a failed batch: back on its live worker, or
        killed and concluded here."""
        if eff.state is not EffectState.RUNNING or eff.id in self.pending_kills or eff.id in self.adoption:
            return
        worker = self.sched.workers.get(eff.worker or "")
        if worker is not None and worker.state is not WorkerState.DEAD:
            worker.effects.add(eff.id)
            if eff.kind is EffectKind.PYTHON:
                worker.python_effect = eff.id
            return
        self.kill_then_conclude(eff, *loss_outcome(Loss.WORKER_LOST, eff.cancel_requested))
