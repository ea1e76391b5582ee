"""Finding the daemon, and starting one on demand.

Whether a daemon runs is decided by its lock, not by the socket file: a daemon holds an flock
on ``effectd.lock`` for its whole life, so if we can take the lock, none runs. Starting is
race-free because the daemon itself takes that lock before binding: when ten clients start ten
daemons at once, one wins and the others exit with EX_TEMPFAIL; every client then just waits for
``hello`` to answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from effectd.ipc.endpoints import LOCK_FILE, LOG_FILE, RUNTIME_ENV, STATE_ENV
from effectd.ipc.errors import DaemonUnavailable

EXIT_ALREADY_RUNNING = 75
DEFAULT_START_TIMEOUT = 15.0


def check_runtime_dir(runtime: Path) -> None:
    """Refuse a runtime dir another user owns or others can write: whoever controls it could
    impersonate the daemon (notably with the /tmp/effectd-<uid> fallback)."""
    try:
        st = runtime.stat()
    except FileNotFoundError:
        return
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise DaemonUnavailable(
            f"refusing runtime dir {runtime}: owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o} "
            f"(must be ours and not group/other-writable)")


def running_pid(runtime: Path) -> int | None:
    """The pid of the daemon holding the runtime dir's lock, or None if no daemon holds it."""
    path = runtime / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def log_tail(state: Path, lines: int = 15) -> str:
    try:
        text = (state / LOG_FILE).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def spawn_daemon(runtime: Path, state: Path, extra_args: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``effectd`` fully detached: new session, stdio to the log, no inherited descriptors."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(os.environ)
    env[RUNTIME_ENV] = str(runtime)
    env[STATE_ENV] = str(state)
    env["EFFECTD_STARTED_BY"] = "autostart"
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(var, None)
    argv = [sys.executable, "-m", "effectd.daemon.main", "--log-file", str(state / LOG_FILE),
            *(extra_args or [])]
    with open(os.devnull, "rb") as devnull:
        return subprocess.Popen(argv, env=env, stdin=devnull, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                cwd="/")


def ensure_daemon(runtime: Path, state: Path, probe: Callable[[], bool],
                  timeout: float = DEFAULT_START_TIMEOUT) -> None:
    """Start a daemon unless one runs, then wait until ``probe()`` (a hello) succeeds."""
    proc: subprocess.Popen[bytes] | None = None
    if running_pid(runtime) is None:
        proc = spawn_daemon(runtime, state)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if probe():
            _reap_later(proc)
            return
        if proc is not None:
            status = proc.poll()
            if status is not None and status != EXIT_ALREADY_RUNNING:
                raise DaemonUnavailable(
                    f"effectd failed to start (exit status {status}); last lines of "
                    f"{state / LOG_FILE}:\n{log_tail(state)}")
            if status == EXIT_ALREADY_RUNNING:
                proc = None  # another client's daemon won the race; wait for it
        elif running_pid(runtime) is None and time.monotonic() + 0.2 < deadline:
            proc = spawn_daemon(runtime, state)  # the daemon we waited for died: try once more
        time.sleep(delay)  # bounded startup wait, not synchronisation of effects
        delay = min(delay * 2, 0.1)
    raise DaemonUnavailable(
        f"effectd did not answer within {timeout:.0f}s of being started; last lines of "
        f"{state / LOG_FILE}:\n{log_tail(state)}")


def _reap_later(proc: subprocess.Popen[bytes] | None) -> None:
    # The daemon outlives us; Popen would warn on garbage collection if it still runs.
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.returncode = 0

