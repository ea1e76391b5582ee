"""Starting and reaping worker processes (the I/O half of the pool; decisions are in core.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid

import psutil

from effectd.daemon.config import DaemonConfig
from effectd.daemon.sdnotify import SystemdNotifier
from effectd.ipc import auth

log = logging.getLogger("effectd.pool")


class WorkerProcesses:
    """Worker processes this daemon spawned (adopted workers from a previous daemon are not
    our children; they are watched through heartbeats and their pid)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.adopted_pids: dict[str, int] = {}
        self.key = b""
        """The daemon's worker key (see effectd.ipc.auth); each worker gets it on an inherited pipe."""

    def spawn(self) -> tuple[str, int]:
        worker_id = f"w-{uuid.uuid4().hex[:10]}"
        cfg = self.config
        argv = [
            sys.executable, "-m", "effectd.daemon.worker",
            "--runtime-dir", str(cfg.runtime_dir), "--outputs", str(cfg.outputs_dir),
            "--worker-id", worker_id, "--slots", str(cfg.worker_slots),
            "--orphan-timeout", str(cfg.orphan_timeout), "--kill-grace", str(cfg.kill_grace),
            "--heartbeat", str(cfg.heartbeat), "--log-level", cfg.log_level,
        ]
        key_fd = auth.key_pipe(self.key)
        argv += ["--key-fd", str(key_fd)]
        env = SystemdNotifier.child_environ(os.environ)
        # A new session: workers (and so the effects) must survive a crash of the daemon and
        # must not receive the terminal's Ctrl-C meant for a foreground daemon.
        # Workers log to stderr: the daemon's, or its log file when it has one (appending; the
        # daemon's size-capped rotation applies to its own records only).
        log_target = open(cfg.log_file, "ab") if cfg.log_file else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                    close_fds=True, stderr=log_target, pass_fds=(key_fd,))
        finally:
            os.close(key_fd)
            if log_target is not None:
                log_target.close()
        self.children[worker_id] = proc
        log.info("spawned worker %s pid %d", worker_id, proc.pid)
        return worker_id, proc.pid

    def reap(self) -> list[tuple[str, int]]:
        """Workers that exited since the last call, with their exit status (-1: unknown, for
        adopted workers of an earlier daemon, which are not our children)."""
        gone: list[tuple[str, int]] = []
        for worker_id, proc in list(self.children.items()):
            status = proc.poll()
            if status is not None:
                del self.children[worker_id]
                gone.append((worker_id, status))
        for worker_id, pid in list(self.adopted_pids.items()):
            try:
                dead = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                dead = True
            except psutil.Error:
                dead = False
            if dead:
                del self.adopted_pids[worker_id]
                gone.append((worker_id, -1))
        return gone

    def alive(self, worker_id: str) -> bool:
        proc = self.children.get(worker_id)
        if proc is not None:
            return proc.poll() is None
        pid = self.adopted_pids.get(worker_id)
        return pid is not None and psutil.pid_exists(pid)

    def kill(self, worker_id: str, pid: int | None) -> None:
        proc = self.children.get(worker_id)
        target = proc.pid if proc is not None else pid
        if target:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, signal.SIGKILL)

    def rss(self, pid: int) -> int:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0

    def wait_all(self, timeout: float) -> None:
        for proc in list(self.children.values()):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)
        self.children.clear()
