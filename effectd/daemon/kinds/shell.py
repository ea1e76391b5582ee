"""A shell effect: a child process in its own session, its output on pipes, its exit via pidfd.

Everything it starts is killed when it ends (tree kill by marker, then whoever still holds its
pipes); its exit status is collected only for its own pid, so a lost status is never a success.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from effectd.daemon.kinds.base import READ_CHUNK, OutputChunk, Phase, Run
from effectd.daemon.kinds.spawn import (
    MAX_PROGRESS_LINE,
    PROGRESS_CHILD_FD,
    PROGRESS_ENV,
    ProgressFd,
    parse_progress_line,
)
from effectd.daemon.proctree import (
    EFFECT_MARKER_ENV,
    KILL_GIVE_UP,
    PipeHolderKill,
    ProcessIdentity,
    TreeKill,
    collect_exit_status,
    own_children,
)
from effectd.ipc.layout import final_marker, stream_path

EXIT_STATUS_UNKNOWN = "exit_status_unknown"
"""Reason of a run that ends ``lost`` because its main process's exit status could not be
collected (ECHILD): never reported as success."""
LEFTOVER_GRACE = 1.0
"""Seconds a background process left behind by a finished shell effect gets between SIGTERM and
SIGKILL: an effect ends when its main process exits, and nothing it started may outlive it."""
STDIN_POLL = 0.02
"""While an effect's stdin is fed from another effect's growing output file, how often to look."""


class ShellRun(Run):
    """A child process in its own session, stdout/stderr on non-blocking pipes, exit via pidfd.

    With ``stdin_from`` its stdin is a pipe the worker feeds from the source effect's stdout
    file as that grows (a durable pipe between effects); EOF once the source is final."""

    def __init__(self, *args: Any, base_env: dict[str, str], stdin_source: Path | None = None,
                 progress_fd: ProgressFd | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.spec
        argv = spec["argv"] if "argv" in spec else ["/bin/sh", "-c", spec["command"]]
        env = dict(spec["env"]) if "env" in spec else dict(base_env)
        env[EFFECT_MARKER_ENV] = self.effect_id
        self.proc: subprocess.Popen[bytes] | None = None
        self._pipes: dict[int, str] = {}
        self._pipe_files: dict[int, Any] = {}
        self._pidfd = -1
        self._exit_status: int | None = None
        self._collected = False  # the main pid's status was collected (or is known to be lost)
        self._kill: TreeKill | None = None
        self._leftover_kill: TreeKill | None = None
        self._holder_kill: PipeHolderKill | None = None
        self._pipe_inodes: set[int] = set()
        self.spawn_error: dict[str, Any] | None = None
        self._stdin_w = -1
        self._stdin_source = stdin_source
        self._stdin_offset = 0
        self._stdin_buf = b""
        self._progress_r = -1
        self._progress_buf = b""
        self.sibling_pids: Callable[[], set[int]] = set  # main pids of the worker's other effects
        progress_r, progress_w = os.pipe2(os.O_CLOEXEC)
        env[PROGRESS_ENV] = str(PROGRESS_CHILD_FD)
        stdin_r = -1
        if stdin_source is not None:
            stdin_r, self._stdin_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self._stdin_w, False)
        try:
            self.proc = (progress_fd or ProgressFd()).popen(
                argv, progress_w, spec.get("rlimits"), cwd=spec.get("cwd"), env=env,
                stdin=stdin_r if stdin_r >= 0 else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.spawn_error = {"type": type(exc).__name__, "message": str(exc), "traceback": ""}
            for fd in (progress_r, self._stdin_w):
                if fd >= 0:
                    os.close(fd)
            self._stdin_w = -1
            return
        finally:
            os.close(progress_w)
            if stdin_r >= 0:
                os.close(stdin_r)
        self._progress_r = progress_r
        os.set_blocking(progress_r, False)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for pipe, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self._pipes[fd] = name
            self._pipe_files[fd] = pipe
            self._pipe_inodes.add(os.fstat(fd).st_ino)  # to find who else holds them (escapees)
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            self._pidfd = -1
        with contextlib.suppress(psutil.Error):
            self.create_time = psutil.Process(self.pid).create_time()

    @property
    def identity(self) -> ProcessIdentity | None:
        if self.pid is None or self.create_time is None:
            return None
        return ProcessIdentity(self.pid, self.create_time)

    def fds(self) -> list[int]:
        fds = list(self._pipes)
        if self._pidfd >= 0:
            fds.append(self._pidfd)
        if self._progress_r >= 0:
            fds.append(self._progress_r)
        return fds

    def _read_progress(self) -> None:
        try:
            data = os.read(self._progress_r, MAX_PROGRESS_LINE)
        except BlockingIOError:
            return
        if not data:
            os.close(self._progress_r)
            self._progress_r = -1
            return
        self._progress_buf += data
        *lines, self._progress_buf = self._progress_buf.split(b"\n")
        if len(self._progress_buf) > MAX_PROGRESS_LINE:
            self._progress_buf = b""
        for line in lines:
            parsed = parse_progress_line(line)
            if parsed is not None:
                self.progress.append(parsed)

    def _feed_stdin(self) -> None:
        """Copy newly written bytes of the source's stdout into our child's stdin pipe."""
        if self._stdin_w < 0 or self._stdin_source is None:
            return
        try:
            if not self._stdin_buf:
                final = final_marker(self._stdin_source).exists()  # checked before reading: no lost tail
                try:
                    fd = os.open(stream_path(self._stdin_source, "stdout"), os.O_RDONLY)
                except FileNotFoundError:
                    fd = -1
                if fd >= 0:
                    try:
                        self._stdin_buf = os.pread(fd, READ_CHUNK, self._stdin_offset)
                    finally:
                        os.close(fd)
                self._stdin_offset += len(self._stdin_buf)
                if not self._stdin_buf and final:
                    os.close(self._stdin_w)
                    self._stdin_w = -1
                    return
            while self._stdin_buf:
                n = os.write(self._stdin_w, self._stdin_buf)
                self._stdin_buf = self._stdin_buf[n:]
        except BlockingIOError:
            return
        except (BrokenPipeError, OSError):
            # The child closed its stdin (e.g. `head -n1`): stop feeding.
            self._stdin_buf = b""
            if self._stdin_w >= 0:
                os.close(self._stdin_w)
                self._stdin_w = -1

    def _read(self, fd: int) -> list[OutputChunk]:
        chunks: list[OutputChunk] = []
        name = self._pipes[fd]
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return chunks
            except OSError:
                data = b""
            if not data:
                self._close_pipe(fd)
                return chunks
            offset, kept = self.writer.write(name, data)
            if kept:
                chunks.append(OutputChunk(name, offset, kept))
            if len(data) < READ_CHUNK:
                return chunks

    def _close_pipe(self, fd: int) -> None:
        # Close through the Popen file object that owns the descriptor: closing the raw fd
        # would let the object close the same number again later, after it was reused by
        # another effect's pipe.
        self._pipes.pop(fd, None)
        pipe = self._pipe_files.pop(fd, None)
        with contextlib.suppress(OSError):
            if pipe is not None:
                pipe.close()
            else:
                os.close(fd)

    def on_readable(self, fd: int) -> list[OutputChunk]:
        if fd == self._pidfd:
            self._reap()
            return []
        if fd == self._progress_r:
            self._read_progress()
            return []
        if fd in self._pipes:
            return self._read(fd)
        return []

    def _reap(self) -> None:
        """Collect the main process's exit status: only here, only for its pid (never through
        ``Popen.poll``, which turns ECHILD into exit code 0)."""
        if self.proc is None or self.pid is None or self._collected:
            return
        done, status = collect_exit_status(self.pid, self._pidfd)
        if done:
            self._mark_collected(status)

    def _mark_collected(self, status: int | None) -> None:
        assert self.proc is not None
        self._collected = True
        self._exit_status = status
        # Popen must never wait on this pid again: once reaped it may belong to another
        # process (and a Popen dropped un-waited is waited on by pid from CPython's cleanup).
        # Its returncode is only that flag here; the run's report holds the truth.
        self.proc.returncode = status if status is not None else -1
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _has_leftovers(self) -> bool:
        """Did the effect leave processes behind? The worker is their subreaper, so any survivor
        is (below) a direct child of the worker carrying this effect's marker: checking those is
        far cheaper than scanning every process."""
        known = self.sibling_pids()
        for pid in own_children():
            if pid == self.pid or pid in known:
                continue
            with contextlib.suppress(psutil.Error):
                child = psutil.Process(pid)
                if child.status() != psutil.STATUS_ZOMBIE and child.environ().get(EFFECT_MARKER_ENV) == self.effect_id:
                    return True
        return False

    def owned_pids(self) -> set[int]:
        """Pids whose exit status this run has yet to collect: nobody else may reap them."""
        return {self.pid} if self.pid is not None and self.proc is not None and not self._collected else set()

    def stop(self, state: str, reason: str) -> None:
        if self.phase is not Phase.RUNNING or self.proc is None:
            return
        self.end_state, self.end_reason = state, reason
        self.phase = Phase.KILLING
        self._kill = self._start_kill(self.identity, self.kill_grace)

    def tick(self, now: float) -> list[OutputChunk]:
        if self.phase is Phase.DONE:
            return []
        if self.spawn_error is not None:
            return self._finish("failed", reason="spawn_failed", error=self.spawn_error)
        mono = time.monotonic()  # kill deadlines are monotonic; ``now`` is the worker's wall clock
        if self._pidfd < 0:
            self._reap()  # no pidfd on this kernel: fall back to polling
        if not self._collected:
            self._feed_stdin()
        elif self._stdin_w >= 0:
            os.close(self._stdin_w)
            self._stdin_w = -1
        if self.phase is Phase.RUNNING and self.deadline is not None and mono >= self.deadline:
            self.stop("timed_out", "timeout")
        chunks: list[OutputChunk] = []
        self._advance_kills(mono)
        if self._collected and self._pipes:
            # Main process gone but a pipe is still open: a background process inherited it.
            for fd in list(self._pipes):
                chunks += self._read(fd)
            if self._pipes and self._leftover_kill is None and self._kill is None:
                self._leftover_kill = self._start_kill(None, LEFTOVER_GRACE)
            if self._pipes:
                chunks += self._drive_holder_kill(mono)
        if not self._collected or self._pipes or self._killing():
            return chunks
        if self._leftover_kill is None and self._kill is None and self._has_leftovers():
            # Normal exit with pipes closed; still take down anything it left behind.
            self._leftover_kill = self._start_kill(None, LEFTOVER_GRACE)
            return chunks
        return chunks + self._conclude()

    def _start_kill(self, root: ProcessIdentity | None, grace: float) -> TreeKill:
        # A worker's kill gives up shortly after SIGKILL: an effect must end within its grace
        # (+ 1 s) even if something of it cannot be killed; what survives is reported as leaked.
        kill = TreeKill(self.effect_id, root, grace=grace, give_up_after=KILL_GIVE_UP)
        kill.start()
        return kill

    def _killing(self) -> bool:
        # The holder kill does not count: it only matters while the pipes are open.
        return any(k is not None and not k.done for k in (self._kill, self._leftover_kill))

    def _advance_kills(self, mono: float) -> None:
        for kill in (self._kill, self._leftover_kill):
            if kill is not None and not kill.done:
                kill.poll(mono)
        if self._kill is not None and self._kill.leaked and not self._collected:
            self._reap()
            if not self._collected:
                # The main process outlived SIGKILL (uninterruptible sleep): its status will
                # not come in time. Give it up (counted as leaked); the orphan reaper collects it.
                self._mark_collected(None)

    def _drive_holder_kill(self, mono: float) -> list[OutputChunk]:
        """The tree is gone (or given up) and the pipes are still open: escaped processes hold
        them. Kill those we may, then close our ends whatever still holds them."""
        tree_kills = [k for k in (self._kill, self._leftover_kill) if k is not None]
        if any(not k.done for k in tree_kills):
            return []
        if self._holder_kill is None:
            deadlines = [k.deadline for k in tree_kills if k.deadline is not None]
            given_up = {p.pid for k in tree_kills if k.leaked for p in k.survivors}  # counted there
            self._holder_kill = PipeHolderKill(self._pipe_inodes, max([mono, *deadlines]), ignore=given_up)
        if not self._holder_kill.poll(mono):
            return []
        chunks: list[OutputChunk] = []
        for fd in list(self._pipes):
            chunks += self._read(fd)
            if fd in self._pipes:
                self._close_pipe(fd)
        return chunks

    def _leaked(self) -> int:
        """Processes of the effect still alive as it ends: survivors of a kill that gave up, and
        holders of its pipes we could not kill (a holder kill cut short by EOF found none)."""
        leaked = sum(k.leaked for k in (self._kill, self._leftover_kill) if k is not None)
        if self._holder_kill is not None and self._holder_kill.done:
            leaked += self._holder_kill.leaked
        return leaked

    def _conclude(self) -> list[OutputChunk]:
        status = self._exit_status
        if status is None:
            # Nobody can say how it ended; "succeeded" would be a guess.
            if self.end_state is not None:
                return self._finish(self.end_state, reason=self.end_reason)
            return self._finish("lost", reason=EXIT_STATUS_UNKNOWN)
        exit_code = status if status >= 0 else None
        sig = -status if status < 0 else None
        if self.end_state is not None:
            return self._finish(self.end_state, reason=self.end_reason, exit_code=exit_code, signal=sig)
        if status == 0:
            return self._finish("succeeded", exit_code=0)
        reason = f"killed by {signal_name(sig)}{_LIMIT_SIGNALS.get(sig, '')}" if sig else f"exit code {status}"
        return self._finish("failed", reason=reason, exit_code=exit_code, signal=sig)

    def next_deadline(self) -> float | None:
        if self.phase is Phase.KILLING or (self._collected and self.phase is not Phase.DONE):
            return time.monotonic() + 0.05  # kill in progress: re-check soon
        if self._stdin_w >= 0:
            return time.monotonic() + STDIN_POLL
        return self.deadline

    def _finish(self, state: str, **fields: Any) -> list[OutputChunk]:
        for fd in (self._stdin_w, self._progress_r):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._stdin_w = self._progress_r = -1
        return super()._finish(state, leaked_processes=self._leaked(), **fields)


_LIMIT_SIGNALS: dict[int, str] = {int(signal.SIGXCPU): " (cpu time limit)",
                                   int(signal.SIGXFSZ): " (file size limit)"}


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)
