"""The daemon's event loop: the sockets, the journal batch, and the glue to the core.

One thread, one ``zmq.Poller``. Each turn drains what is ready on every socket (bounded per
turn, so no peer starves the others), lets the handlers and the scheduler decide, commits the
journal batch once, and only then sends replies, assignments and events (the "outbox"). A
``wait`` is parked, never blocking; the loop's timeout is the nearest deadline.

Sockets (all bound here, in the 0700 runtime dir):
  control  ROUTER  clients' REQ/DEALER requests
  stream   XPUB    output chunks and lifecycle events to clients' SUB sockets
  workers  ROUTER  workers' DEALER sockets
  publish  XSUB    workers' PUB sockets (chunks forwarded to ``stream``)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from effectd.daemon.config import DaemonConfig
from effectd.daemon.core import NEVER_STARTED, Effect, Limits, Scheduler, Worker, WorkerState
from effectd.daemon.ids import UlidGenerator
from effectd.daemon.intake import Intake, forget_interrupted
from effectd.daemon.liveness import TURN_ALLOWANCE, HearingClock
from effectd.daemon.lock import AlreadyRunning, RuntimeLock, StateLock
from effectd.daemon.pool import WorkerProcesses
from effectd.daemon.proctree import ProcessIdentity, TreeKill, effect_processes
from effectd.daemon.requests import RequestHandlers, Waiter
from effectd.daemon.retention import Retention
from effectd.daemon.sdnotify import SystemdNotifier
from effectd.daemon.worker import HEARTBEAT_LIVENESS
from effectd.ipc import auth, codec, messages, records
from effectd.ipc.dirs import RUNTIME_DIR, ensure_private_dir
from effectd.ipc.endpoints import Endpoints, stream_hwm
from effectd.ipc.errors import (
    BadRequest,
    DiskFull,
    EffectdError,
    InternalError,
    JournalLost,
    TooLarge,
    Unavailable,
    UnsafeDirectory,
)
from effectd.ipc.schema import (
    OPS,
    EffectKind,
    EffectState,
    parse_request,
    request_id_of,
)
from effectd.journal import Journal, OutputStore

log = logging.getLogger("effectd.daemon")

MAX_BATCH = 512
"""Messages taken from one socket per loop turn (fairness between clients, workers, streams)."""
WORKER_START_TIMEOUT = 30.0
SPAWN_BACKOFF_MAX = 60.0
CRASH_WINDOW = 60.0
CRASH_LOOP_THRESHOLD = 3
TURN_WARNING = 0.5
"""A loop turn longer than this is logged (when it is the longest so far)."""
RUNTIME_CHECK_INTERVAL = 0.5
"""Seconds between checks that our runtime dir and its lock are still there."""
SHUTDOWN_OVERRUN = 15.0
"""Seconds past drain + kill grace after which shutdown stops without concluding everything."""
COMMIT_RETRY_DELAY = 1.0
"""After a failed commit, seconds before the daemon concludes its own kills again (workers re-send
their reports every few seconds by themselves): retrying on every loop turn would spin."""
EXIT_JOURNAL_LOST = 74
"""EX_IOERR: the journal was deleted or replaced under us. Non-zero, so systemd's
``Restart=on-failure`` starts a new daemon on whatever journal is at the path now."""


def reported_time(value: Any, not_before: float) -> float | None:
    """A wall time a worker reported, if it is plausible: finite, not before ``not_before`` and
    not in the future (same machine, same clock; anything else is a bug or garbage)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if value < not_before or value > time.time() + 1.0:
        return None
    return float(value)


@dataclass
class PendingKill:
    """An effect whose process tree is being killed before it is concluded."""

    effect_id: str
    kill: TreeKill
    state: EffectState
    reason: str


def _matches_record(eff: Effect, rec: dict[str, Any]) -> bool:
    """Whether the in-memory effect agrees with its journal record on what decides its course."""
    return (eff.state.value == rec["state"] and eff.attempt == (rec.get("attempt") or 0)
            and eff.worker == rec.get("worker") and eff.cancel_requested == rec.get("cancel_requested"))


def _outcome_without_worker(eff: Effect) -> tuple[EffectState, str]:
    """How a running effect ends when no worker is left to report it."""
    if eff.cancel_requested == "daemon_stopped":
        return EffectState.LOST, "daemon_stopped"
    if eff.cancel_requested:
        return EffectState.CANCELLED, eff.cancel_requested
    return EffectState.FAILED, "worker_lost"


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.instance = uuid.uuid4().hex
        self.ids = UlidGenerator()
        self.sched = Scheduler(Limits(parallel=config.parallel, max_workers=config.max_workers,
                                      min_workers=config.min_workers, worker_slots=config.worker_slots,
                                      max_queued=config.max_queued))
        self.handlers = RequestHandlers(self)
        self.intake = Intake(self)
        self.waiters: list[Waiter] = []
        self.outbox: list[tuple[zmq.Socket[bytes], list[bytes], bool]] = []
        self.pending_kills: dict[str, PendingKill] = {}
        self.final_markers: list[str] = []
        self.adopting: dict[str, float] = {}
        self.procs = WorkerProcesses(config)
        self.notifier = SystemdNotifier.from_environ()
        self.managed_by = "systemd" if self.notifier.enabled else os.environ.get("EFFECTD_STARTED_BY", "foreground")
        self.draining = False
        self.drain_deadline: float | None = None
        self.interrupting_since: float | None = None
        self.stop_requested = False
        self.stop_now = False
        self.ready_sent = False
        self.worker_failures = 0
        self.crash_times: collections.deque[float] = collections.deque()
        self.spawn_not_before = 0.0
        self.journal_lost: JournalLost | None = None
        self.exit_code = 0
        self.conclude_not_before = 0.0
        self._last_hb_sent = 0.0
        self._last_pool_check = 0.0
        self.hearing = HearingClock(min(TURN_ALLOWANCE, config.heartbeat))
        """Workers' ``last_seen`` is on this clock: time this loop could not listen is not silence."""
        self.worst_turn = 0.0
        self.endpoints = Endpoints.for_runtime(config.runtime_dir)
        self.journal: Journal
        self.outputs: OutputStore
        self.worker_key = b""
        self.runtime_lock: RuntimeLock | None = None
        """Set by main once taken; watched so a vanished runtime dir is restored."""
        self.state_lock: StateLock | None = None
        """Set by main once taken; watched so that losing the journal's lock stops us."""
        self._last_runtime_check = 0.0
        self.runtime_lost = False

    # ---- setup ----------------------------------------------------------------------------

    def open_state(self) -> None:
        """Open the journal and outputs; the caller holds the state dir's lock."""
        self.worker_key = self.procs.key = auth.load_or_create_key(self.config.state_dir)
        self.journal = Journal(self.config.journal_path)
        self.outputs = OutputStore(self.config.outputs_dir)
        cfg = self.config
        self.retention = Retention(self.journal, self.outputs, cfg.retain_days, cfg.retain_count,
                                   cfg.retain_bytes, last_run=time.monotonic(),
                                   on_deleted=self.handlers.effects_deleted)
        forget_interrupted(self)
        groups = self.journal.get_meta("group_limits") or {}
        self.sched.group_limits.update(groups)

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
            self.workers_sock = ctx.socket(zmq.ROUTER)
            self.workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.workers_sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.workers_sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_WORKER_MESSAGE_BYTES)
            self.workers_sock.setsockopt(zmq.LINGER, 500)
            self.stream = ctx.socket(zmq.XPUB)
            self.stream.setsockopt(zmq.XPUB_VERBOSE, 1)
            self.stream.setsockopt(zmq.SNDHWM, stream_hwm())
            self.stream.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscribers only send subscriptions
            self.stream.setsockopt(zmq.LINGER, 0)
            self.publish = ctx.socket(zmq.XSUB)
            self.publish.setsockopt(zmq.RCVHWM, stream_hwm())
            self.publish.setsockopt(zmq.LINGER, 0)
            self._bind_endpoints()
        finally:
            os.umask(old_umask)

    def _bind_endpoints(self) -> None:
        ep = self.endpoints
        for sock, addr in ((self.control, ep.control), (self.workers_sock, ep.workers),
                           (self.stream, ep.stream), (self.publish, ep.publish)):
            path = addr[len("ipc://"):]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale file of a dead daemon; we hold the lock
            sock.bind(addr)
            os.chmod(path, 0o600)

    def watch_runtime_dir(self, now: float) -> None:
        """Restore a runtime dir that vanished (logind removes $XDG_RUNTIME_DIR at logout, tmpfiles
        cleans /tmp): re-create it 0700, re-take its lock and bind our endpoints there again. The
        old listeners stay open: connections accepted through them (workers, clients) are not
        tied to the file and keep working, so nothing in flight is lost. If the dir cannot be
        ours again, drain and stop: a daemon nobody can reach must not keep the journal."""
        if now - self._last_runtime_check < RUNTIME_CHECK_INTERVAL:
            return
        self._last_runtime_check = now
        self.watch_state_lock()
        if self.runtime_lock is None or self.runtime_lock.still_ours():
            return
        runtime = self.config.runtime_dir
        log.warning("runtime dir %s vanished or was replaced; restoring it", runtime)
        old_umask = os.umask(0o077)  # socket files 0600
        try:
            ensure_private_dir(runtime, RUNTIME_DIR)
            self.runtime_lock.retake()
            self._bind_endpoints()
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
        now = time.monotonic()
        for rec in self.journal.unfinished():
            eff = Effect.from_record(rec)
            self.sched.add(eff)
            if eff.state is EffectState.RUNNING:
                self.adopting[eff.id] = now + self.config.adopt_grace
        if self.sched.effects:
            log.info("recovered %d queued and %d running effects", len(self.sched.queued()),
                     len(self.adopting))

    # ---- outbox ---------------------------------------------------------------------------

    def queue_send(self, sock: zmq.Socket[bytes], frames: list[bytes], durable: bool = True) -> None:
        self.outbox.append((sock, frames, durable))

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
        self.queue_send(self.control, [ident, b"", body], durable)

    def reply_error(self, ident: bytes, request_id: Any, exc: EffectdError) -> None:
        self.queue_send(self.control, [ident, b"", records.error_reply(request_id, exc.code, exc.message)],
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
        self.queue_send(self.workers_sock, [ident, body, auth.sign(self.worker_key, body)], durable)

    def publish_event(self, effect_id: str, event: messages.EventType, **fields: Any) -> None:
        header = messages.EventHeader(event=event, **fields)
        self.queue_send(self.stream, [effect_id.encode(), messages.encode(header), b""])

    def flush(self) -> None:
        """Commit the batch, then send. If the commit fails, nothing that needed it is sent."""
        try:
            self.journal.commit()
        except DiskFull as exc:
            log.error("journal commit failed, refusing this batch: %s", exc)
            self._after_failed_commit(exc)
            self.final_markers = []
        except JournalLost as exc:
            self.lose_journal(exc)
        for eid in self.final_markers:  # only once the final state is durable
            with contextlib.suppress(OSError):
                self.outputs.mark_final(eid)
        self.final_markers = []
        outbox, self.outbox = self.outbox, []
        self.handlers.credits.turn_flushed()
        for sock, frames, _ in outbox:
            try:
                # copy=False: large replies (read_output data) are handed to libzmq without a
                # second copy; small frames are copied anyway (pyzmq's copy_threshold).
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                # A client that went away (EHOSTUNREACH) or a full link: never let it stop us.
                log.debug("send dropped: %s", exc)

    def lose_journal(self, exc: JournalLost) -> None:
        """Stop acknowledging anything and exit non-zero: whatever we commit now goes to a file no
        restart will read. Workers are left running (as after a crash) for the next daemon."""
        log.critical("%s; refusing this batch and exiting (status %d) so that a new daemon starts on the "
                     "journal now at that path", exc, EXIT_JOURNAL_LOST)
        self._after_failed_commit(exc)
        self.final_markers = []
        self.journal_lost = exc
        self.exit_code = EXIT_JOURNAL_LOST
        self.stop_requested = True

    def _after_failed_commit(self, exc: Unavailable) -> None:
        kept: list[tuple[zmq.Socket[bytes], list[bytes], bool]] = []
        for sock, frames, durable in self.outbox:
            if not durable:
                kept.append((sock, frames, durable))
            elif sock is self.control:
                try:
                    rid = request_id_of(codec.unpack(frames[2]))
                except EffectdError:
                    rid = None
                kept.append((sock, [frames[0], b"", records.error_reply(rid, exc.code, exc.message)], False))
            # assignments, acks and events of the failed batch are dropped: the journal is the truth
        self.outbox = kept
        self.conclude_not_before = time.monotonic() + COMMIT_RETRY_DELAY
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
            self._supervise_restored(restored)
        self.sched.reindex_backoffs()

    def _supervise_restored(self, eff: Effect) -> None:
        if eff.state is not EffectState.RUNNING or eff.id in self.pending_kills or eff.id in self.adopting:
            return
        worker = self.sched.workers.get(eff.worker or "")
        if worker is not None and worker.state is not WorkerState.DEAD:
            worker.effects.add(eff.id)
            if eff.kind is EffectKind.PYTHON:
                worker.python_effect = eff.id
            return
        self.kill_then_conclude(eff, *_outcome_without_worker(eff))

    def _journaled(self, step: Any, *args: Any) -> None:
        """Run a loop step whose journal writes may fail mid-way (disk full): then the whole batch
        is refused, as when its commit fails, and memory goes back to what the journal holds."""
        try:
            step(*args)
        except DiskFull as exc:
            log.error("journal write failed, refusing this batch: %s", exc)
            self.journal.rollback()
            self._after_failed_commit(exc)
            self.final_markers = []

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

    # ---- effects --------------------------------------------------------------------------

    def conclude(self, eff: Effect, state: EffectState, *, reason: str | None = None,
                 fields: dict[str, Any] | None = None, finished_at: float | None = None) -> None:
        final = self.sched.conclude(eff, state, time.time(), reason=reason, fields=fields,
                                    finished_at=finished_at)
        self.adopting.pop(eff.id, None)
        if final:
            # The one place a final state is written; the journal refuses a second one.
            if not self.journal.put_final(eff.to_record()):
                log.error("refused to record effect %s as %s: the journal already holds a final state "
                          "for it (a final state never changes)", eff.id, eff.state.value)
                self.handlers.effect_final(eff.id)
                return
            self.final_markers.append(eff.id)
            self.handlers.effect_final(eff.id)
            self.publish_event(eff.id, "finished", state=eff.state.value, attempt=eff.attempt,
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
            if eff.id in self.adopting:
                self.kill_then_conclude(eff, EffectState.CANCELLED, reason)
            elif eff.worker:
                self.to_worker(eff.worker, messages.Cancel(id=eff.id, reason=reason), durable=False)

    def unclaimed_after_crash(self, eff: Effect) -> None:
        """No worker claimed a recovered running effect within the adopt grace. At most once:
        only an attempt with no evidence of ever starting (no journaled start, its claim file
        voided by us before any worker made it, no process carrying its marker) runs again;
        anything that may have started is killed and concluded lost."""
        never_started = (eff.pid is None and self.outputs.void_attempt(eff.id, eff.attempt)
                         and not effect_processes(eff.id))
        if never_started:
            log.info("effect %s attempt %d never started before the crash: queued again", eff.id, eff.attempt)
            attempt = eff.attempt
            self.sched.requeue_unstarted(eff, time.time())
            self.journal.put_effect(eff.to_record(), "requeued", {"attempt": attempt, "reason": NEVER_STARTED})
            return
        log.warning("effect %s was not re-adopted within %.0fs", eff.id, self.config.adopt_grace)
        self.kill_then_conclude(eff, EffectState.LOST, "daemon_crashed")

    def kill_then_conclude(self, eff: Effect, state: EffectState, reason: str) -> None:
        """For effects no live worker supervises: kill their tree here, conclude when it is gone."""
        if eff.id in self.pending_kills:
            return
        self.adopting.pop(eff.id, None)
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
            self.send_worker(frames[0], messages.encode(messages.Reset()))
            return
        worker.last_seen = self.hearing.now()
        if isinstance(msg, messages.Heartbeat):
            worker.effects_done = msg.effects_done or worker.effects_done
            worker.rss = msg.rss or worker.rss
        elif isinstance(msg, messages.Started):
            eff = self.sched.effects.get(msg.id)
            if eff is not None and eff.attempt == msg.attempt and eff.state is EffectState.RUNNING:
                if eff.id in self.adopting and eff.id not in self.pending_kills:
                    # An assignment of the previous daemon that this worker read only now: it
                    # claims the effect, which is as good as re-adoption.
                    self.claimed_by(eff, worker)
                eff.pid, eff.create_time = msg.pid, msg.create_time
                eff.started_at = reported_time(msg.started_at, eff.submitted_at) or eff.started_at
                self.journal.put_effect(eff.to_record(), "started", {"pid": eff.pid})
        elif isinstance(msg, messages.Finished):
            self.effect_finished(wid, msg)
        elif isinstance(msg, messages.Progress):
            eff = self.sched.effects.get(msg.id)
            if eff is not None:
                eff.progress = {"fraction": msg.fraction, "message": msg.message, "time": time.time()}
                self.publish_event(eff.id, "progress", fraction=msg.fraction, message=msg.message, time=time.time())
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
                if eff.id in self.adopting or eff.worker != wid:
                    eff.pid = rep.pid or eff.pid
                    eff.create_time = rep.create_time or eff.create_time
                    eff.started_at = reported_time(rep.started_at, eff.submitted_at) or eff.started_at
                    self.claimed_by(eff, worker)
                else:
                    worker.effects.add(eff.id)
                    if eff.kind is EffectKind.PYTHON:
                        worker.python_effect = eff.id
            else:
                # Not ours to run (already final, or unknown to this journal): stop it.
                self.to_worker(wid, messages.Cancel(id=rep.id, reason="not_adopted"), durable=False)
        self.send_worker(wid.encode(), messages.encode(messages.Welcome(instance=self.instance)))

    def claimed_by(self, eff: Effect, worker: Worker) -> None:
        """Re-adopt a recovered effect on the worker that reports running it."""
        log.info("re-adopted effect %s on worker %s", eff.id, worker.id)
        self.adopting.pop(eff.id, None)
        eff.worker = worker.id
        worker.effects.add(eff.id)
        if eff.kind is EffectKind.PYTHON:
            worker.python_effect = eff.id
        self.journal.put_effect(eff.to_record(), "adopted", {"worker": worker.id})

    def effect_finished(self, wid: str, rep: messages.Finished) -> None:
        eff = self.sched.effects.get(rep.id)
        if eff is not None and eff.state is EffectState.RUNNING and eff.attempt == rep.attempt:
            state = EffectState(rep.state)
            reason = rep.reason
            if eff.cancel_requested in ("daemon_stopped",) and state is EffectState.CANCELLED:
                state, reason = EffectState.LOST, "daemon_stopped"
            elif state is EffectState.CANCELLED and eff.cancel_requested:
                reason = eff.cancel_requested
            fields = {"exit_code": rep.exit_code, "signal": rep.signal, "result": rep.result, "error": rep.error,
                      "sizes": rep.sizes or {}, "truncated": rep.truncated or {},
                      "leaked_processes": rep.leaked_processes or 0}
            self.pending_kills.pop(eff.id, None)
            # The worker's own clock says when it ran: a report delivered after a daemon restart
            # must not stretch the effect to the time of re-adoption.
            eff.started_at = reported_time(rep.started_at, eff.submitted_at) or eff.started_at
            self.conclude(eff, state, reason=reason, fields=fields,
                          finished_at=reported_time(rep.finished_at, eff.started_at or eff.submitted_at))
        # Duplicates and late reports never change a final state; always acknowledge them so the
        # worker forgets the report.
        self.to_worker(wid, messages.Ack(id=rep.id, attempt=rep.attempt))

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
        if not was_stopping and not self.draining:
            # Crash-loop protection: more than CRASH_LOOP_THRESHOLD crashes within
            # CRASH_WINDOW seconds delays the next spawn exponentially (reported by hello).
            now = time.monotonic()
            self.crash_times.append(now)
            while self.crash_times and now - self.crash_times[0] > CRASH_WINDOW:
                self.crash_times.popleft()
            self.worker_failures += 1
            recent = len(self.crash_times)
            if recent > CRASH_LOOP_THRESHOLD:
                backoff = min(SPAWN_BACKOFF_MAX, 0.1 * (2 ** (recent - CRASH_LOOP_THRESHOLD)))
                self.spawn_not_before = now + backoff
                log.warning("%d worker crashes in %.0fs: next worker start delayed %.1fs", recent,
                            CRASH_WINDOW, backoff)
        for eff in effects:
            self.kill_then_conclude(eff, *_outcome_without_worker(eff))
        worker.effects.clear()
        worker.python_effect = None
        del self.sched.workers[worker.id]

    # ---- periodic work --------------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        wall = time.time()
        for wid, status in self.procs.reap():
            worker = self.sched.workers.get(wid)
            if worker is not None:
                self.worker_lost(worker, f"exited with status {status}")
        self.check_liveness()
        if now - self._last_hb_sent >= self.config.heartbeat:
            self._last_hb_sent = now
            for worker in self.sched.workers.values():
                if worker.state in (WorkerState.READY, WorkerState.STOPPING):
                    self.send_worker(worker.id.encode(), messages.encode(messages.DaemonHeartbeat()))
        for eid, deadline in list(self.adopting.items()):
            if now >= deadline:
                eff = self.sched.effects.get(eid)
                if eff is not None:
                    self.unclaimed_after_crash(eff)
                self.adopting.pop(eid, None)
        for eid, pk in list(self.pending_kills.items()):
            if now >= self.conclude_not_before and pk.kill.poll(now):
                del self.pending_kills[eid]
                eff = self.sched.effects.get(eid)
                if eff is not None and eff.state is EffectState.RUNNING:
                    self.conclude(eff, pk.state, reason=pk.reason, fields={"sizes": self.outputs.sizes(eid)})
        if not self.draining:
            self.schedule(wall, now)
        self.maintain_pool(now)
        if self.retention.due(now) and not self.draining:
            self.retention.collect()
        self.handlers.resolve_waiters(now)
        self.drive_shutdown(now)
        if self.notifier.enabled:
            counts = self.sched.counts()
            self.notifier.status(f"{counts.get('running', 0)} running, {counts.get('queued', 0)} queued, "
                                 f"{len(self.sched.live_workers())} workers")
        if not self.ready_sent and (self.ready_workers() >= self.config.min_workers or now - self.started > 10):
            self.ready_sent = True
            self.notifier.ready()
        self.notifier.tick()

    def check_liveness(self) -> None:
        """Declare lost the workers silent for ``HEARTBEAT_LIVENESS`` heartbeats of listening time.

        What workers already sent is read first: during a long turn it queued unread, and a
        worker must never be blamed for the loop's own silence. Silence is measured on the
        hearing clock, which stops while this process was stopped or stalled (liveness.py)."""
        if not self._drain(self.workers_sock, self.on_worker):
            return  # more is queued than one batch: judge once it has been read
        heard = self.hearing.now()
        liveness = self.config.heartbeat * HEARTBEAT_LIVENESS
        for worker in list(self.sched.workers.values()):
            silent = heard - worker.last_seen
            if worker.state is WorkerState.STARTING and silent > WORKER_START_TIMEOUT:
                self.worker_lost(worker, "never became ready")
            elif worker.state in (WorkerState.READY, WorkerState.STOPPING) and silent > liveness:
                self.worker_lost(worker, f"silent for {silent:.1f}s")

    def recent_crashes(self) -> int:
        now = time.monotonic()
        while self.crash_times and now - self.crash_times[0] > CRASH_WINDOW:
            self.crash_times.popleft()
        return len(self.crash_times)

    def ready_workers(self) -> int:
        return sum(1 for w in self.sched.workers.values() if w.state is WorkerState.READY)

    def schedule(self, wall: float, now: float) -> None:
        assignments, dep_failed, spawn = self.sched.plan(wall, self.handlers.state_of)
        for eff in dep_failed:
            self.conclude(eff, EffectState.CANCELLED, reason="dependency_failed")
        for eff, worker in assignments:
            with contextlib.suppress(OSError):  # if it fails, the worker reports spawn_failed
                self.outputs.prepare(eff.id)
            self.sched.start(eff, worker, wall)
            self.journal.put_effect(eff.to_record(), "running", {"worker": worker.id, "attempt": eff.attempt})
            self.to_worker(worker.id, messages.Assign(id=eff.id, attempt=eff.attempt, spec=eff.spec))
            self.publish_event(eff.id, "started", state="running", attempt=eff.attempt, time=wall)
        if spawn and now >= self.spawn_not_before:
            for _ in range(spawn):
                wid, pid = self.procs.spawn()
                self.sched.add_worker(Worker(id=wid, pid=pid, last_seen=self.hearing.now()))

    def maintain_pool(self, now: float) -> None:
        if self.draining:
            return
        # The RSS check reads /proc for every idle worker: once per half heartbeat is enough,
        # not every loop turn. The other checks are integer comparisons.
        check_rss = now - self._last_pool_check >= self.config.heartbeat / 2
        if check_rss:
            self._last_pool_check = now
        cfg = self.config
        for worker in self.sched.idle_workers_to_retire(now, cfg.worker_idle_timeout):
            self.retire(worker, "idle")
        for worker in list(self.sched.workers.values()):
            if worker.state is not WorkerState.READY or worker.effects:
                continue
            if cfg.max_effects_per_worker and worker.effects_done >= cfg.max_effects_per_worker:
                self.retire(worker, "max_effects_per_worker")
            elif check_rss and cfg.max_worker_rss and worker.pid and self.procs.rss(worker.pid) > cfg.max_worker_rss:
                self.retire(worker, "max_worker_rss")

    def retire(self, worker: Worker, why: str) -> None:
        log.info("retiring worker %s (%s)", worker.id, why)
        worker.state = WorkerState.STOPPING
        self.to_worker(worker.id, messages.Stop(reason=why), durable=False)

    # ---- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self, drain: bool) -> None:
        now = time.monotonic()
        if self.draining and not drain:
            self.stop_now = True
        if not self.draining:
            self.draining = True
            self.notifier.stopping()
            self.drain_deadline = now + (self.config.drain_timeout if drain else 0.0)
            log.info("shutting down (%s)", f"drain up to {self.config.drain_timeout:.0f}s" if drain else "now")
            for w in self.waiters:  # nobody should wait on a daemon that is going away
                w.deadline = min(w.deadline, now + (self.config.drain_timeout if drain else 0.0))
        if self.stop_now:
            self.drain_deadline = now

    def drive_shutdown(self, now: float) -> None:
        if not self.draining or self.drain_deadline is None:
            return
        if now > self.drain_deadline + self.config.kill_grace + SHUTDOWN_OVERRUN:
            # Something cannot be concluded (e.g. the journal cannot be written): stop anyway;
            # close() kills our workers, and the journal keeps what it has for the next start.
            log.error("shutdown overran by %.0fs; stopping without concluding %d effect(s)",
                      SHUTDOWN_OVERRUN, len(self.sched.running()))
            for w in self.sched.workers.values():
                if w.state is not WorkerState.DEAD:
                    self.to_worker(w.id, messages.Stop(reason="daemon_stopped"), durable=False)
            self.stop_requested = True
            return
        running = self.sched.running()
        if running and now >= self.drain_deadline and self.interrupting_since is None:
            self.interrupting_since = now
            for eff in running:
                eff.cancel_requested = None
                self.cancel_effect(eff, "daemon_stopped")
        if running and self.interrupting_since is not None:
            if now - self.interrupting_since < self.config.kill_grace + 5:
                return
            for eff in running:  # workers did not report in time: kill here
                self.kill_then_conclude(eff, EffectState.LOST, "daemon_stopped")
        if running or self.pending_kills:
            return
        live = [w for w in self.sched.workers.values() if w.state is not WorkerState.DEAD]
        for w in live:
            if w.state is WorkerState.STARTING:
                # Not connected yet, so a 'stop' message cannot reach it; it holds no effects.
                self.procs.kill(w.id, w.pid)
                w.state = WorkerState.STOPPING
            elif w.state is not WorkerState.STOPPING:
                self.retire(w, "daemon_stopped")
        if not self.procs.children and not self.procs.adopted_pids:
            self.stop_requested = True
        elif self.interrupting_since is None and now - self.drain_deadline > 10:
            self.stop_requested = True  # workers that ignore stop are killed in close()

    # ---- loop -----------------------------------------------------------------------------

    def poll_timeout(self) -> int:
        if self.outbox or self.journal.dirty or self.intake.busy:
            return 0
        timeout = self.config.heartbeat / 2
        now = time.monotonic()
        if self.waiters:
            timeout = min(timeout, max(0.0, self.handlers.next_deadline() - now))
        if self.pending_kills or self.draining:
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
        for sock in (self.control, self.workers_sock, self.stream, self.publish):
            poller.register(sock, zmq.POLLIN)
        while not self.stop_requested:
            self.watch_runtime_dir(time.monotonic())  # here the outbox is empty
            timeout_ms = self.poll_timeout()
            events = dict(poller.poll(timeout_ms))
            turn_started = time.monotonic()
            deaf = self.hearing.turn(timeout_ms / 1000)
            if deaf:
                log.warning("the loop could not listen for %.1fs (stopped or stalled); workers' liveness "
                            "windows are extended by that much", deaf)
            if self.workers_sock in events:
                self._journaled(self._drain, self.workers_sock, self.on_worker)
            if self.control in events:
                self._drain(self.control, self.on_control)
            if self.publish in events:
                self._forward_chunks()
            if self.stream in events:
                self._forward_subscriptions()
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

    def _drain(self, sock: zmq.Socket[bytes], handler: Any) -> bool:
        """Handle up to MAX_BATCH messages; True if the socket was emptied."""
        for _ in range(MAX_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            handler(frames)
        return False

    def _forward_chunks(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = self.publish.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            with contextlib.suppress(zmq.Again):
                self.stream.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def _forward_subscriptions(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                msg = self.stream.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg or msg[0] not in (0, 1):
                continue
            self.publish.send(msg)  # so workers' PUB sockets filter at the source
            topic = msg[1:]
            if msg[0] == 1 and len(topic) == 26:
                # Tell the new subscriber its subscription is live (no sleeping, no nudging).
                state = self.handlers.state_of(topic.decode(errors="replace"))
                header = messages.EventHeader(event="subscribed", state=state.value if state else None)
                self.queue_send(self.stream, [topic, messages.encode(header), b""], durable=False)

    def close(self) -> None:
        for waiter in self.waiters:
            self.reply_error(waiter.ident, waiter.request_id,
                             Unavailable("the daemon stopped while this wait was parked; wait again"))
        self.waiters = []
        self.intake.abandon(Unavailable("the daemon stopped before this batch was journaled; nothing of it was "
                                        "submitted"))
        self.flush()
        if self.journal_lost is None:
            self.procs.wait_all(timeout=5.0)
            for pid in self.procs.adopted_pids.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for sock in (self.control, self.workers_sock, self.stream, self.publish):
            sock.close()
        self.ctx.term()
        if self.journal_lost is None:
            # Not after a lost journal: SQLite's close would checkpoint and then delete the
            # -wal/-shm files *by name*, i.e. those of a journal restored at that path.
            self.journal.close()
        if self.runtime_lost:
            return  # what is at the runtime path now is not ours to remove
        for addr in (self.endpoints.control, self.endpoints.stream, self.endpoints.workers,
                     self.endpoints.publish):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr[len("ipc://"):])

