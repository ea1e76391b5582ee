"""The daemon's event loop: the glue between the sockets, the journal and the deciding core.

One thread, one ``zmq.Poller``. Each turn drains what is ready on every socket (bounded per
turn, so no peer starves the others), lets the handlers and the scheduler decide, commits the
journal batch once, and only then sends replies, assignments and events (outbox.py). A
``wait`` is parked (waits.py), never blocking; the loop's timeout is the nearest deadline.

The decisions are not made here: scheduling is in core.py, supervision policies (crash
backoff, loss -> final state, adoption deadlines, liveness, recycling) in policy.py, the
phases of a shutdown in shutdown.py. This module carries out what they decide. The sockets
are described in sockets.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from effectd.daemon.config import DaemonConfig
from effectd.daemon.core import Effect, Limits, Scheduler, WorkerState
from effectd.daemon.ids import UlidGenerator
from effectd.daemon.intake import Intake, forget_interrupted
from effectd.daemon.liveness import TURN_ALLOWANCE, HearingClock
from effectd.daemon.lock import AlreadyRunning, RuntimeLock, StateLock
from effectd.daemon.outbox import Outbox
from effectd.daemon.policy import CrashBackoff, Loss, Throttle, loss_outcome
from effectd.daemon.pool import WorkerProcesses
from effectd.daemon.requests import RequestHandlers
from effectd.daemon.retention import Retention
from effectd.daemon.sdnotify import SystemdNotifier
from effectd.daemon.shutdown import SHUTDOWN_OVERRUN, DrainAction, Shutdown
from effectd.daemon.sockets import MAX_BATCH, Sockets
from effectd.daemon.supervisor import Supervisor
from effectd.daemon.waits import WaitTable
from effectd.ipc import auth, codec, messages, records
from effectd.ipc.constants import EXIT_JOURNAL_LOST
from effectd.ipc.dirs import RUNTIME_DIR, ensure_private_dir
from effectd.ipc.endpoints import Endpoints
from effectd.ipc.errors import (
    BadRequest,
    DiskFull,
    EffectdError,
    InternalError,
    JournalLost,
    Unavailable,
    UnsafeDirectory,
)
from effectd.ipc.schema import OPS, EffectState, parse_request, request_id_of
from effectd.journal import Journal, OutputStore

log = logging.getLogger("effectd.daemon")

TURN_WARNING = 0.5
"""A loop turn longer than this is logged (when it is the longest so far)."""
RUNTIME_CHECK_INTERVAL = 0.5
"""Seconds between checks that our runtime dir and its lock are still there."""
COMMIT_RETRY_DELAY = 1.0
"""After a failed commit, seconds before the daemon concludes its own kills again (workers re-send
their reports every few seconds by themselves): retrying on every loop turn would spin."""


def _matches_record(eff: Effect, rec: dict[str, Any]) -> bool:
    """Whether the in-memory effect agrees with its journal record on what decides its course."""
    return (eff.state.value == rec["state"] and eff.attempt == (rec.get("attempt") or 0)
            and eff.worker == rec.get("worker") and eff.cancel_requested == rec.get("cancel_requested"))


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.instance = uuid.uuid4().hex
        self.ids = UlidGenerator()
        self.sched = Scheduler(Limits(parallel=config.parallel, max_workers=config.max_workers,
                                      min_workers=config.min_workers, worker_slots=config.worker_slots,
                                      max_queued=config.max_queued))
        self.waits = WaitTable(config.max_waits)
        self.handlers = RequestHandlers(self)
        self.intake = Intake(self, self.handlers)
        self.endpoints = Endpoints.for_runtime(config.runtime_dir)
        self.sockets = Sockets(self.endpoints)
        self.outbox = Outbox(self.sockets)
        self.procs = WorkerProcesses(config)
        self.notifier = SystemdNotifier.from_environ()
        self.managed_by = "systemd" if self.notifier.enabled else os.environ.get("EFFECTD_STARTED_BY", "foreground")
        self.shutdown = Shutdown(config.drain_timeout, config.kill_grace)
        self.runtime_checks = Throttle(RUNTIME_CHECK_INTERVAL)
        self.stop_requested = False
        self.ready_sent = False
        self.journal_lost: JournalLost | None = None
        self.exit_code = 0
        self.hearing = HearingClock(min(TURN_ALLOWANCE, config.heartbeat))
        """Workers' ``last_seen`` is on this clock: time this loop could not listen is not silence."""
        self.worst_turn = 0.0
        self.journal: Journal
        self.outputs: OutputStore
        self.retention: Retention
        self.supervisor: Supervisor
        """Made once the journal is open (open_state)."""
        self.runtime_lock: RuntimeLock | None = None
        """Set by main once taken; watched so a vanished runtime dir is restored."""
        self.state_lock: StateLock | None = None
        """Set by main once taken; watched so that losing the journal's lock stops us."""
        self.runtime_lost = False

    @property
    def draining(self) -> bool:
        return self.shutdown.draining

    @property
    def crashes(self) -> CrashBackoff:
        return self.supervisor.crashes

    def cancel_effect(self, eff: Effect, reason: str) -> None:
        self.supervisor.cancel_effect(eff, reason)

    # ---- setup ----------------------------------------------------------------------------

    def open_state(self) -> None:
        """Open the journal and outputs; the caller holds the state dir's lock."""
        self.outbox.worker_key = self.procs.key = auth.load_or_create_key(self.config.state_dir)
        self.journal = Journal(self.config.journal_path)
        self.outputs = OutputStore(self.config.outputs_dir)
        cfg = self.config
        self.retention = Retention(self.journal, self.outputs, cfg.retain_days, cfg.retain_count,
                                   cfg.retain_bytes, last_run=time.monotonic(),
                                   on_deleted=self.waits.effects_deleted)
        forget_interrupted(self.journal)
        self.supervisor = Supervisor(cfg, self.sched, self.journal, self.outputs, self.outbox, self.waits, self.procs,
                                     self.hearing, self.shutdown, self.instance, self.handlers.state_of)
        groups = self.journal.get_meta("group_limits") or {}
        self.sched.group_limits.update(groups)

    def bind(self) -> None:
        self.sockets.bind()

    def watch_runtime_dir(self, now: float) -> None:
        """Restore a runtime dir that vanished (logind removes $XDG_RUNTIME_DIR at logout, tmpfiles
        cleans /tmp): re-create it 0700, re-take its lock and bind our endpoints there again. The
        old listeners stay open: connections accepted through them (workers, clients) are not
        tied to the file and keep working, so nothing in flight is lost. If the dir cannot be
        ours again, drain and stop: a daemon nobody can reach must not keep the journal."""
        if not self.runtime_checks.due(now):
            return
        self.watch_state_lock()
        if self.runtime_lock is None or self.runtime_lock.still_ours():
            return
        runtime = self.config.runtime_dir
        log.warning("runtime dir %s vanished or was replaced; restoring it", runtime)
        old_umask = os.umask(0o077)  # socket files 0600
        try:
            ensure_private_dir(runtime, RUNTIME_DIR)
            self.runtime_lock.retake()
            self.sockets.bind_endpoints()
        except (UnsafeDirectory, AlreadyRunning, OSError, zmq.ZMQError) as exc:
            log.error("cannot restore runtime dir %s (%s): stopping", runtime, exc)
            self.runtime_lock = None
            self.runtime_lost = True
            self.begin_shutdown(drain=True)
            return
        finally:
            os.umask(old_umask)
        log.info("runtime dir %s restored", runtime)

    def watch_state_lock(self) -> None:
        """If our ``daemon.json`` was removed, lock a new one at once; if another daemon got it
        first, it owns the journal now: drain and stop (the journal refuses second final states
        meanwhile)."""
        if self.state_lock is None or self.state_lock.still_ours():
            return
        try:
            self.state_lock.retake_for(self.config.runtime_dir, self.instance)
            log.warning("the state dir's lock file was removed; locked a new one")
        except (AlreadyRunning, OSError) as exc:
            log.error("lost the journal's lock (%s): stopping", exc)
            self.state_lock = None
            self.begin_shutdown(drain=True)

    def recover(self) -> None:
        """Load unfinished effects. Queued ones run as normal; running ones wait ``adopt_grace``
        for their worker to reconnect and report them, then become lost (``daemon_crashed``)."""
        for rec in self.journal.unfinished():
            eff = Effect.from_record(rec)
            self.sched.add(eff)
            if eff.state is EffectState.RUNNING:
                self.supervisor.adoption.expect(eff.id)
        if self.sched.effects:
            log.info("recovered %d queued and %d running effects", len(self.sched.queued()),
                     len(self.supervisor.adoption))

    # ---- outbox (sent after the commit) ---------------------------------------------------

    def reply(self, ident: bytes, request_id: Any, reply: records.Reply, durable: bool = True) -> None:
        self.outbox.reply(ident, request_id, reply, durable)

    def reply_error(self, ident: bytes, request_id: Any, exc: EffectdError) -> None:
        self.outbox.reply_error(ident, request_id, exc)

    def flush(self) -> None:
        """Commit the batch, then send. If the commit fails, nothing that needed it is sent."""
        try:
            self.journal.commit()
        except DiskFull as exc:
            log.error("journal commit failed, refusing this batch: %s", exc)
            self._after_failed_commit(exc)
            self.supervisor.final_markers = []
        except JournalLost as exc:
            self.lose_journal(exc)
        for eid in self.supervisor.final_markers:  # only once the final state is durable
            with contextlib.suppress(OSError):
                self.outputs.mark_final(eid)
        self.supervisor.final_markers = []
        self.handlers.credits.turn_flushed()
        self.outbox.send_all()

    def lose_journal(self, exc: JournalLost) -> None:
        """Stop acknowledging anything and exit non-zero: whatever we commit now goes to a file no
        restart will read. Workers are left running (as after a crash) for the next daemon."""
        log.critical("%s; refusing this batch and exiting (status %d) so that a new daemon starts on the "
                     "journal now at that path", exc, EXIT_JOURNAL_LOST)
        self._after_failed_commit(exc)
        self.supervisor.final_markers = []
        self.journal_lost = exc
        self.exit_code = EXIT_JOURNAL_LOST
        self.stop_requested = True

    def _after_failed_commit(self, exc: Unavailable) -> None:
        self.outbox.refuse_durable(exc)
        self.supervisor.conclude_not_before = time.monotonic() + COMMIT_RETRY_DELAY
        self._resync_with_journal()

    def _resync_with_journal(self) -> None:
        """Memory may be ahead of the journal after a failed batch: make it what the journal holds,
        including effects whose conclusion was lost (they were already dropped from memory), and
        re-arm what concludes them again: their worker re-sends its unacknowledged report; an
        effect no live worker supervises is killed and concluded here again."""
        now = time.time()
        durable = {rec["id"]: rec for rec in self.journal.unfinished()}
        for eid in list(self.sched.effects):
            if eid not in durable:  # submitted in the failed batch: never acknowledged
                self.sched.release(self.sched.effects.pop(eid), now)
        for eid, rec in durable.items():
            eff = self.sched.effects.get(eid)
            if eff is not None and _matches_record(eff, rec):
                continue
            if eff is not None:
                self.sched.release(eff, now)
            restored = Effect.from_record(rec)
            self.sched.add(restored)
            if eff is not None:
                restored.seq = eff.seq  # keeps its place in the queue
            self.supervisor.supervise_restored(restored)
        self.sched.reindex_backoffs()

    def _journaled(self, step: Callable[..., Any], *args: Any) -> None:
        """Run a loop step whose journal writes may fail mid-way (disk full): then the whole batch
        is refused, as when its commit fails, and memory goes back to what the journal holds."""
        try:
            step(*args)
        except DiskFull as exc:
            log.error("journal write failed, refusing this batch: %s", exc)
            self.journal.rollback()
            self._after_failed_commit(exc)
            self.supervisor.final_markers = []

    # ---- control requests -----------------------------------------------------------------

    def on_control(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        ident = frames[0]
        # REQ clients send [ident, b"", body]; DEALER clients may omit the delimiter.
        body_frames = frames[2:] if frames[1] == b"" else frames[1:]
        request_id: Any = None
        try:
            if len(body_frames) != 1:
                raise BadRequest(f"expected exactly one message frame, got {len(body_frames)}")
            msg = codec.unpack(body_frames[0])
            request_id = request_id_of(msg)
            req = parse_request(msg, check_batch=False)  # big batches are checked in slices (intake.py)
        except EffectdError as exc:
            self.reply_error(ident, request_id, exc)
            return
        if self.journal_lost is not None and OPS[req.op].mutating:
            self.reply_error(ident, req.id, self.journal_lost)
            return
        # A savepoint per request: a request that fails half-way undoes only its own writes,
        # never those of other requests in the same batch whose replies are already queued.
        self.journal.savepoint()
        failure: EffectdError | None = None
        try:
            reply = self.handlers.dispatch(ident, req)
        except EffectdError as exc:
            failure = exc
        except MemoryError:
            # Answered after the except block: the traceback holds what filled the memory, and
            # one request must never end the loop.
            failure = InternalError(f"the daemon ran out of memory handling {req.op}; ask for less")
        except Exception as exc:
            log.exception("request %s failed", req.op)
            failure = InternalError(f"{type(exc).__name__}: {exc}")
        if failure is not None:
            if failure.code == "internal":
                log.error("request %s (rid %r) failed: %s", req.op, req.id, failure.message)
            self.journal.rollback_to_savepoint()
            self.reply_error(ident, req.id, failure)
            return
        self.journal.release_savepoint()
        if reply is not None:
            self.reply(ident, req.id, reply, durable=OPS[req.op].mutating or req.op == "wait")

    # ---- periodic work --------------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        wall = time.time()
        sup = self.supervisor
        sup.reap()
        self.check_liveness()
        sup.send_heartbeats(now)
        sup.judge_unclaimed(now)
        sup.conclude_killed(now)
        if not self.draining:
            sup.schedule(wall, now)
        sup.maintain_pool(now)
        if self.retention.due(now) and not self.draining:
            self.retention.collect()
        self.handlers.answer_waits(now)
        self.drive_shutdown(now)
        if self.notifier.enabled:
            counts = self.sched.counts()
            self.notifier.status(f"{counts.get('running', 0)} running, {counts.get('queued', 0)} queued, "
                                 f"{len(self.sched.live_workers())} workers")
        if not self.ready_sent and (sup.ready_workers() >= self.config.min_workers or now - self.started > 10):
            self.ready_sent = True
            self.notifier.ready()
        self.notifier.tick()

    def check_liveness(self) -> None:
        """What workers already sent is read first: during a long turn it queued unread, and a
        worker must never be blamed for the loop's own silence. Silence is measured on the
        hearing clock, which stops while this process was stopped or stalled (liveness.py)."""
        if self._drain(self.sockets.workers, self.supervisor.on_worker):
            self.supervisor.judge_liveness()
        # else more is queued than one batch: judge once it has been read

    # ---- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self, drain: bool) -> None:
        deadline = self.shutdown.begin(drain)
        if deadline is not None:
            self.notifier.stopping()
            log.info("shutting down (%s)", f"drain up to {self.config.drain_timeout:.0f}s" if drain else "now")
            self.waits.cap_deadlines(deadline)  # nobody should wait on a daemon that is going away

    def drive_shutdown(self, now: float) -> None:
        """Carry out the shutdown's phase (shutdown.py)."""
        sup = self.supervisor
        running = self.sched.running()
        workers_left = bool(self.procs.children or self.procs.adopted_pids)
        for action in self.shutdown.step(now, bool(running), bool(sup.pending_kills), workers_left):
            if action is DrainAction.ABANDON:
                # Something cannot be concluded (e.g. the journal cannot be written): stop anyway;
                # close() kills our workers, and the journal keeps what it has for the next start.
                log.error("shutdown overran by %.0fs; stopping without concluding %d effect(s)",
                          SHUTDOWN_OVERRUN, len(running))
                for w in self.sched.workers.values():
                    if w.state is not WorkerState.DEAD:
                        self.outbox.to_worker(w.id, messages.Stop(reason="daemon_stopped"), durable=False)
                self.stop_requested = True
            elif action is DrainAction.INTERRUPT:
                for eff in running:
                    eff.cancel_requested = None
                    sup.cancel_effect(eff, "daemon_stopped")
            elif action is DrainAction.KILL:  # workers did not report in time: kill here
                for eff in running:
                    sup.kill_then_conclude(eff, *loss_outcome(Loss.DAEMON_STOPPED, eff.cancel_requested))
            elif action is DrainAction.RETIRE_WORKERS:
                sup.retire_all()
            elif action is DrainAction.STOP:
                self.stop_requested = True  # workers that ignore stop are killed in close()

    # ---- loop -----------------------------------------------------------------------------

    def poll_timeout(self) -> int:
        if self.outbox or self.journal.dirty or self.intake.busy:
            return 0
        timeout = self.config.heartbeat / 2
        now = time.monotonic()
        if len(self.waits):
            timeout = min(timeout, max(0.0, self.waits.next_deadline() - now))
        if self.supervisor.pending_kills or self.draining:
            timeout = min(timeout, 0.05)
        retry_at = self.sched.next_retry_at()
        if retry_at is not None:
            timeout = min(timeout, max(0.0, retry_at - time.time()))
        interval = self.notifier.watchdog_interval
        if interval:
            timeout = min(timeout, interval / 2)
        return int(timeout * 1000) + 1

    def run_loop(self) -> None:
        poller = zmq.Poller()
        for sock in self.sockets.all():
            poller.register(sock, zmq.POLLIN)
        sockets = self.sockets
        while not self.stop_requested:
            self.watch_runtime_dir(time.monotonic())  # here the outbox is empty
            timeout_ms = self.poll_timeout()
            events = dict(poller.poll(timeout_ms))
            turn_started = time.monotonic()
            deaf = self.hearing.turn(timeout_ms / 1000)
            if deaf:
                log.warning("the loop could not listen for %.1fs (stopped or stalled); workers' liveness "
                            "windows are extended by that much", deaf)
            if sockets.workers in events:
                self._journaled(self._drain, sockets.workers, self.supervisor.on_worker)
            if sockets.control in events:
                self._drain(sockets.control, self.on_control)
            if sockets.publish in events:
                sockets.forward_chunks()
            if sockets.stream in events:
                self._confirm_subscriptions(sockets.forward_subscriptions())
            if self.intake.busy:
                self.intake.step()
            self._journaled(self.tick)
            self.flush()
            self._note_turn(time.monotonic() - turn_started)

    def _note_turn(self, seconds: float) -> None:
        if seconds > self.worst_turn:
            self.worst_turn = seconds
            if seconds > TURN_WARNING:
                log.warning("a loop turn took %.2fs (the longest so far)", seconds)

    def _drain(self, sock: zmq.Socket[bytes], handler: Callable[[list[bytes]], None]) -> bool:
        """Handle up to MAX_BATCH messages; True if the socket was emptied."""
        for _ in range(MAX_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            handler(frames)
        return False

    def _confirm_subscriptions(self, topics: list[bytes]) -> None:
        """Tell each new subscriber its subscription is live (no sleeping, no nudging)."""
        for topic in topics:
            state = self.handlers.state_of(topic.decode(errors="replace"))
            header = messages.EventHeader(event="subscribed", state=state.value if state else None)
            self.outbox.queue(self.sockets.stream, [topic, messages.encode(header), b""], durable=False)

    def close(self) -> None:
        for waiter in self.waits.take_all():
            self.reply_error(waiter.ident, waiter.request_id,
                             Unavailable("the daemon stopped while this wait was parked; wait again"))
        self.intake.abandon(Unavailable("the daemon stopped before this batch was journaled; nothing of it was "
                                        "submitted"))
        self.flush()
        if self.journal_lost is None:
            self.procs.wait_all(timeout=5.0)
            for pid in self.procs.adopted_pids.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.sockets.close()
        if self.journal_lost is None:
            # Not after a lost journal: SQLite's close would checkpoint and then delete the
            # -wal/-shm files *by name*, i.e. those of a journal restored at that path.
            self.journal.close()
        if self.runtime_lost:
            return  # what is at the runtime path now is not ours to remove
        self.sockets.unlink()

