"""A worker process: runs effects assigned by the daemon and reports them.

Started fresh by the daemon (``python -m effectd.daemon.worker``; never forked from a process that
holds a zmq context). It connects a DEALER to the daemon's worker ROUTER and a PUB to the daemon's
XSUB, says READY, then runs a single poll loop over the DEALER, its children's pipes and pidfds.

A worker hosts many shell and sleep effects at once (they are child processes or timers) or one
python effect (which runs in a thread of the worker). It is a child subreaper, so processes that
its effects' children orphan are re-parented to it and can be found and killed.

The worker survives its daemon: if the daemon goes silent it keeps running its effects and
writing their output, re-sends READY (with what it runs and what finished unacknowledged) until a
daemon answers, and gives up - killing its effects - only after ``orphan_timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from effectd.daemon.kinds.base import READ_CHUNK, OutputChunk, Phase, Run
from effectd.daemon.kinds.python import PythonRun
from effectd.daemon.kinds.shell import ShellRun
from effectd.daemon.kinds.sleep import SleepRun
from effectd.daemon.kinds.spawn import ProgressFd
from effectd.daemon.liveness import TURN_ALLOWANCE, HearingClock
from effectd.daemon.output import OutputWriter
from effectd.daemon.proctree import DEFAULT_KILL_GRACE, become_subreaper, reap_orphan_zombies
from effectd.ipc import auth, messages
from effectd.ipc.constants import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_ORPHAN_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
)
from effectd.ipc.dirs import RUNTIME_DIR, pin_dir
from effectd.ipc.endpoints import Endpoints, stream_hwm
from effectd.ipc.errors import EffectdError, UnsafeDirectory
from effectd.ipc.layout import effect_dir
from effectd.ipc.schema import PROTOCOL_VERSION
from effectd.journal.outputs import claim_attempt

log = logging.getLogger("effectd.worker")



def own_rss() -> int | None:
    """This process's resident set size in bytes, sent with each heartbeat (``hello`` reports
    it per worker); None if /proc cannot tell."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None

REAP_INTERVAL = 0.2
"""How often orphaned zombies (adopted as subreaper) are reaped."""
UNACKED_RESEND = 5.0
"""Seconds after which completion reports the daemon has not acknowledged are sent again."""


class WorkerProcess:
    """This worker process: its sockets to the daemon, the runs it hosts, and its poll loop."""

    def __init__(self, endpoints: Endpoints, outputs_root: Path, *, worker_id: str, slots: int,
                 orphan_timeout: float, kill_grace: float, heartbeat: float = HEARTBEAT_INTERVAL,
                 key: bytes, progress_fd: ProgressFd | None = None) -> None:
        self.endpoints = endpoints
        self.progress_fd = progress_fd or ProgressFd()
        """fd 3 reserved at start (see effectd.daemon.kinds.spawn), lent to each shell run's spawn."""
        self.key = key
        self.outputs_root = outputs_root
        self.worker_id = worker_id
        self.slots = slots
        self.orphan_timeout = orphan_timeout
        self.kill_grace = kill_grace
        self.heartbeat = heartbeat
        self._dir_fd = -1
        self.via = endpoints
        """The endpoints we connect to: through the pinned runtime dir (see effectd.ipc.dirs.pin_dir)."""
        self._pin()  # raises: a worker never starts on an unsafe runtime dir
        self.ctx = zmq.Context()
        self.transport_up = False
        """The DEALER's connection to the daemon's socket is established (from its monitor)."""
        self.replaced_dealer = False
        """The DEALER was replaced during the current silence of the daemon."""
        self.monitor: zmq.Socket[bytes]
        self.dealer: zmq.Socket[bytes] = self._new_dealer()
        self.pub: zmq.Socket[bytes] = self._new_pub()
        self.runs: dict[str, Run] = {}
        self.unacked: dict[str, dict[str, Any]] = {}
        self.effects_done = 0
        # Silence of the daemon is measured on this clock: while this worker itself was stopped
        # or stalled it could not hear the daemon, and that is not the daemon's silence.
        self.hearing = HearingClock(min(TURN_ALLOWANCE, heartbeat))
        self.last_heard = self.hearing.now()
        self.last_sent = 0.0
        self.last_resend = time.monotonic()
        self.last_reap = 0.0
        self.connected = False
        self.disconnected_since: float | None = None
        self.stopping = False
        self.exit_after_ack = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._capture: dict[int, str] = {}
        self.base_env = dict(os.environ)

    # ---- sockets --------------------------------------------------------------------------

    def _pin(self) -> None:
        """Check the runtime dir (lstat) and pin it: our sockets, and zmq's reconnects, go to this
        directory only. Called at start and at every reconnect of ours."""
        fd, via = pin_dir(self.endpoints.runtime, RUNTIME_DIR)
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
        self._dir_fd = fd
        self.via = Endpoints.for_runtime(via)

    def _new_dealer(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        # The monitor tells a daemon that is silent but still connected (stopped, paused, busy:
        # the same process, that will read what we queue) from one whose socket is gone.
        self.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.transport_up = False
        sock.connect(self.via.workers)
        return sock

    def _close_dealer(self, linger: int) -> None:
        self.dealer.disable_monitor()
        self.monitor.close(linger=0)
        self.dealer.close(linger=linger)

    def _read_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                self.transport_up = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.transport_up = False

    def _new_pub(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, stream_hwm())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.via.publish)
        return sock

    def _reconnect(self) -> None:
        """Fresh sockets, through the runtime dir as it is now if it is still safe (it may have
        been re-created by a restarted daemon), else through the one pinned before."""
        try:
            self._pin()
        except UnsafeDirectory as exc:
            log.error("runtime dir refused, staying on the previous one: %s", exc.message)
        self._close_dealer(linger=0)
        self.dealer = self._new_dealer()
        self.pub.close(linger=0)
        self.pub = self._new_pub()

    def send(self, msg: messages.WorkerMessage) -> None:
        try:
            self.dealer.send(messages.encode(msg), zmq.NOBLOCK)
            self.last_sent = time.monotonic()
        except zmq.Again:
            log.warning("daemon link full; dropped %s message", type(msg).__name__)

    def send_finished(self, report: dict[str, Any]) -> None:
        """A run's completion report (a dict the run built) as the typed message."""
        try:
            msg = messages.check_report(report, messages.Finished)
        except EffectdError as exc:  # a bug in a run: the report would be refused by the daemon too
            log.error("dropping an invalid completion report of %s: %s", report.get("id"), exc)
            return
        self.send(msg)

    def send_ready(self) -> None:
        self.send(messages.Ready(
            proto=PROTOCOL_VERSION, worker=self.worker_id, pid=os.getpid(), slots=self.slots,
            running=[r.running_report() for r in self.runs.values() if r.phase is not Phase.DONE],
            finished=list(self.unacked.values()), effects_done=self.effects_done,
        ))

    def publish(self, effect_id: str, attempt: int, chunks: list[OutputChunk]) -> None:
        topic = effect_id.encode()
        for c in chunks:
            with contextlib.suppress(zmq.Again):
                self.pub.send_multipart(
                    [topic, messages.encode(messages.ChunkHeader(stream=c.stream, offset=c.offset,  # type: ignore[arg-type]
                                                                 attempt=attempt)), c.data],
                    zmq.NOBLOCK, copy=len(c.data) < 4096)

    # ---- python output capture ------------------------------------------------------------

    def capture_python_output(self) -> None:
        """Point fds 1 and 2 at pipes the loop reads, so what a python effect prints (even from C
        code) is attributed to it. The worker's own log keeps a duplicate of the original stderr."""
        log_fd = os.dup(2)
        handler = logging.StreamHandler(os.fdopen(log_fd, "w", buffering=1))
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s worker[{os.getpid()}]: %(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        for target, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe2(os.O_CLOEXEC)
            os.dup2(w, target)
            os.close(w)
            os.set_blocking(r, False)
            self._capture[r] = name

    def _read_capture(self, fd: int) -> None:
        """Read everything available on one capture pipe and give it to the python run."""
        stream = self._capture[fd]
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            if not data:
                return
            for run in self.runs.values():
                if isinstance(run, PythonRun) and run.phase is not Phase.DONE:
                    self.publish(run.effect_id, run.attempt, run.feed_output(stream, data))
                    break
            else:
                log.info("stray %s output outside any effect: %r", stream, data[:200])

    def _read_all_capture(self) -> None:
        for fd in self._capture:
            self._read_capture(fd)

    def _reap_orphans(self) -> None:
        """Collect zombies of orphans adopted as subreaper, never a pid someone owns: each shell
        run's main pid is its own to collect, and while a python effect runs (or may still run,
        in a worker it poisoned) any child may be one of its subprocesses, whose status its code
        will ask for - they are collected once it ended."""
        if self.exit_after_ack or any(isinstance(r, PythonRun) for r in self.runs.values()):
            return
        owned: set[int] = set()
        for run in self.runs.values():
            if isinstance(run, ShellRun):
                owned |= run.owned_pids()
        reap_orphan_zombies(owned)

    def _main_pids(self) -> set[int]:
        return {r.pid for r in self.runs.values() if r.pid is not None}

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    # ---- daemon messages ------------------------------------------------------------------

    def handle(self, frames: list[bytes]) -> None:
        # Only our daemon knows the key: anyone else who binds workers.sock is ignored (and does
        # not even count as a sign of life).
        if len(frames) != 2 or not auth.verify(self.key, frames[0], frames[1]):
            log.warning("dropped a message without a valid MAC (%d frame(s)): not from our daemon", len(frames))
            return
        raw = frames[0]
        self.last_heard = self.hearing.now()
        self.replaced_dealer = False
        if not self.connected:
            self.connected = True
            self.disconnected_since = None
        try:
            msg = messages.decode_daemon_message(raw)
        except EffectdError as exc:
            log.error("bad message from daemon: %s", exc)
            return
        if isinstance(msg, messages.Assign):
            if self.exit_after_ack or self.stopping:
                log.warning("refusing assignment of %s: this worker is leaving", msg.id)
                return
            self.assign(msg.id, msg.attempt, msg.spec)
        elif isinstance(msg, messages.Cancel):
            run = self.runs.get(msg.id)
            if run is not None:
                run.stop("cancelled", msg.reason or "cancelled")
        elif isinstance(msg, messages.Ack):
            report = self.unacked.get(msg.id)
            if report is not None and report["attempt"] == msg.attempt:
                del self.unacked[msg.id]
            if self.exit_after_ack and not self.unacked and not self.runs:
                self.stopping = True
        elif isinstance(msg, messages.Reset):
            self.send_ready()
        elif isinstance(msg, messages.Stop):
            self.stopping = True
            for run in self.runs.values():
                run.stop("cancelled", msg.reason or "worker_stopped")

    def assign(self, effect_id: str, attempt: int, spec: dict[str, Any]) -> None:
        if effect_id in self.runs:
            return  # duplicate assignment (re-sent after a reconnect): already running
        # The claim comes before anything runs, so after a crash "no claim" proves "never
        # started" and a recovering daemon may re-queue the attempt (at-most-once).
        try:
            claim_attempt(effect_dir(self.outputs_root, effect_id), attempt, f"{self.worker_id} {os.getpid()}")
        except FileExistsError:
            log.warning("refusing assignment of %s attempt %d: already claimed or voided (a stale or "
                        "duplicate assignment)", effect_id, attempt)
            return
        except OSError as exc:
            self._refuse(effect_id, attempt, exc)
            return
        writer = OutputWriter(effect_dir(self.outputs_root, effect_id),
                              int(spec.get("max_output_bytes") or DEFAULT_MAX_OUTPUT_BYTES))
        common: dict[str, Any] = {"kill_grace": self.kill_grace}
        run: Run
        kind = spec["kind"]
        if kind == "shell":
            source = effect_dir(self.outputs_root, spec["stdin_from"]) if spec.get("stdin_from") else None
            run = ShellRun(effect_id, attempt, spec, writer, base_env=self.base_env, stdin_source=source,
                           progress_fd=self.progress_fd, **common)
            run.sibling_pids = self._main_pids
        elif kind == "python":
            run = PythonRun(effect_id, attempt, spec, writer, wake=self._wake, **common)
        else:
            run = SleepRun(effect_id, attempt, spec, writer, **common)
        self.runs[effect_id] = run
        self.send(messages.Started(id=effect_id, attempt=attempt, pid=run.pid, create_time=run.create_time,
                                   started_at=run.started_at))

    def _refuse(self, effect_id: str, attempt: int, exc: OSError) -> None:
        """An attempt that cannot be claimed (its directory is gone or not writable) fails as a
        spawn failure, reported like any completion; for a stale attempt the daemon ignores it."""
        log.warning("cannot claim %s attempt %d: %s", effect_id, attempt, exc)
        now = time.time()
        report = {"id": effect_id, "attempt": attempt, "state": "failed", "reason": "spawn_failed",
                  "error": {"type": type(exc).__name__, "message": f"cannot claim the attempt: {exc}",
                            "traceback": ""},
                  "sizes": {}, "truncated": {}, "started_at": now, "finished_at": now}
        self.unacked[effect_id] = report
        self.send_finished(report)

    # ---- loop -----------------------------------------------------------------------------

    def _after_run_step(self, run: Run, chunks: list[OutputChunk]) -> None:
        if chunks:
            self.publish(run.effect_id, run.attempt, chunks)
        while run.progress:
            fraction, message = run.progress.pop(0)
            self.send(messages.Progress(id=run.effect_id, attempt=run.attempt, fraction=fraction, message=message))
        if run.phase is Phase.DONE and run.report is not None:
            del self.runs[run.effect_id]
            self.effects_done += 1
            self.unacked[run.effect_id] = run.report
            if isinstance(run, PythonRun) and run.poisons_worker:
                # The effect's thread may still be running: this worker must not take more
                # work. 'bye' goes first, so the daemon never sees it free.
                self.exit_after_ack = True
                self.send(messages.Bye(reason="python effect could not be stopped"))
            self.send_finished(run.report)

    def run(self) -> int:
        become_subreaper()
        self.send_ready()
        poller = zmq.Poller()
        while True:
            now = time.monotonic()
            if self.stopping and not self.runs and (not self.unacked or not self.connected):
                break
            poller = zmq.Poller()
            poller.register(self.dealer, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            for fd in self._capture:
                poller.register(fd, zmq.POLLIN)
            fd_owner: dict[int, Run] = {}
            for run in self.runs.values():
                for fd in run.fds():
                    fd_owner[fd] = run
                    poller.register(fd, zmq.POLLIN)
            deadlines = [d for r in self.runs.values() if (d := r.next_deadline()) is not None]
            wait = self.heartbeat / 2
            if deadlines:
                wait = min(wait, max(0.0, min(deadlines) - now))
            events = dict(poller.poll(int(wait * 1000) + 1))
            deaf = self.hearing.turn(wait)
            if deaf:
                log.warning("this worker could not listen for %.1fs (stopped or stalled); not the daemon's silence",
                            deaf)
            if self.monitor in events:
                self._read_monitor()
            if self.dealer in events:
                self._read_daemon()
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            for fd in self._capture:
                if fd in events:
                    self._read_capture(fd)
            for fd, run in fd_owner.items():
                if fd in events and run.effect_id in self.runs:
                    self._after_run_step(run, run.on_readable(fd))
            wall = time.time()
            for run in list(self.runs.values()):
                if isinstance(run, PythonRun):
                    # The effect flushes its stdio before queueing its outcome: drain the
                    # capture pipes first, so its last prints belong to it.
                    chunks, _ = run.drain_events(before_finish=self._read_all_capture)
                    self._after_run_step(run, chunks)
                if run.effect_id in self.runs:
                    self._after_run_step(run, run.tick(wall))
            if time.monotonic() - self.last_reap >= REAP_INTERVAL:
                self.last_reap = time.monotonic()
                self._reap_orphans()
            self._heartbeat(time.monotonic())
        self.close()
        return 0

    def _read_daemon(self) -> None:
        for _ in range(1000):
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(frames)

    def _heartbeat(self, now: float) -> None:
        """``now`` is monotonic time (for our own sending); the daemon's silence and the orphan
        timeout are measured on the hearing clock."""
        heard = self.hearing.now()
        liveness = self.heartbeat * HEARTBEAT_LIVENESS
        if heard - self.last_heard > liveness and self.connected:
            self._read_daemon()  # what the daemon already sent is not silence
        silent = heard - self.last_heard
        if silent > liveness:
            self._read_monitor()
            if self.connected:
                log.warning("daemon silent for %.1fs; keeping effects running%s", silent,
                            "; still connected, so waiting for it" if self.transport_up else ", reconnecting")
                self.connected = False
                self.disconnected_since = heard
            if not self.transport_up and not self.replaced_dealer:
                # zmq reconnects the transport by itself, but a new daemon does not know us:
                # a fresh socket plus READY re-registers (and re-reports our effects). While the
                # connection stands, the daemon is the same process, merely not reading: a new
                # socket would only drop what is queued for it.
                self._reconnect()
                self.replaced_dealer = True
            if self.disconnected_since is not None and heard - self.disconnected_since > self.orphan_timeout:
                log.error("no daemon for %.0fs (orphan timeout): killing effects and exiting",
                          heard - self.disconnected_since)
                self.orphaned()
                return
            if now - self.last_sent >= self.heartbeat:
                self.send_ready()
            return
        if now - self.last_sent >= self.heartbeat:
            self.send(messages.Heartbeat(effects_done=self.effects_done, rss=own_rss()))
        if self.unacked and now - self.last_resend >= UNACKED_RESEND:
            # A completion the daemon could not journal (e.g. disk full) is offered again.
            self.last_resend = now
            for report in list(self.unacked.values()):
                self.send_finished(report)

    def orphaned(self) -> None:
        for run in self.runs.values():
            run.stop("cancelled", "orphaned")
        deadline = time.monotonic() + self.kill_grace + 5
        while self.runs and time.monotonic() < deadline:
            for run in list(self.runs.values()):
                run.tick(time.time())
                if run.phase is Phase.DONE:
                    del self.runs[run.effect_id]
            time.sleep(0.05)
        self.close()
        os._exit(3)

    def close(self) -> None:
        self.send(messages.Bye(reason="stopping"))
        self._close_dealer(linger=1000)
        self.pub.close(linger=0)
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="effectd-worker", description="effectd worker (started by effectd)")
    parser.add_argument("--runtime-dir", required=True, type=Path)
    parser.add_argument("--outputs", required=True, type=Path)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--orphan-timeout", type=float, default=DEFAULT_ORPHAN_TIMEOUT)
    parser.add_argument("--kill-grace", type=float, default=DEFAULT_KILL_GRACE)
    parser.add_argument("--heartbeat", type=float, default=HEARTBEAT_INTERVAL)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--key-fd", type=int, required=True,
                        help="inherited pipe carrying the daemon's worker key (see effectd.ipc.auth)")
    args = parser.parse_args(argv)
    key = auth.read_key_fd(args.key_fd)  # first: closed before anything could inherit it
    logging.basicConfig(level=args.log_level.upper())
    # Our session is our own (the daemon started us with start_new_session): a Ctrl-C in the
    # daemon's terminal or a daemon crash does not reach us. SIGTERM ends us after killing effects.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    progress_fd = ProgressFd.reserve()  # before zmq opens descriptors
    try:
        worker = WorkerProcess(Endpoints.for_runtime(args.runtime_dir), args.outputs,
                        worker_id=args.worker_id or f"w{os.getpid()}-{uuid.uuid4().hex[:6]}",
                        slots=args.slots, orphan_timeout=args.orphan_timeout, kill_grace=args.kill_grace,
                        heartbeat=args.heartbeat, key=key, progress_fd=progress_fd)
    except UnsafeDirectory as exc:
        log.error("%s", exc.message)
        return 1

    def on_term(signum: int, frame: Any) -> None:
        worker.stopping = True
        for run in worker.runs.values():
            run.stop("cancelled", "worker_stopped")

    signal.signal(signal.SIGTERM, on_term)
    worker.capture_python_output()
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
