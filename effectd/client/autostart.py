"""Finding the daemon, and starting one on demand.

Whether a daemon runs is decided by its locks, not by the socket file: a daemon holds an flock
on ``<runtime>/effectd.lock`` and on ``<state>/daemon.json`` for its whole life. A client talks
to the daemon of its runtime dir; if none holds that lock but one holds the state dir's (the
runtime dir was removed at logout, or this session has another ``XDG_RUNTIME_DIR``), it talks
to that one, at the runtime dir its ``daemon.json`` names - never starting a second daemon on
the same journal. Starting is race-free because the daemon itself takes the locks before
binding: when ten clients start ten daemons at once, one wins and the others exit with
EX_TEMPFAIL; every client then just waits for ``hello`` to answer.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from effectd.ipc.constants import EXIT_ALREADY_RUNNING
from effectd.ipc.dirs import (
    RUNTIME_DIR,
    STATE_DIR,
    check_private_dir,
    ensure_private_dir,
    runtime_lock_pid,
    state_owner,
)
from effectd.ipc.endpoints import LOG_FILE, RUNTIME_ENV, STATE_ENV
from effectd.ipc.errors import DaemonUnavailable, UnsafeDirectory

DEFAULT_START_TIMEOUT = 15.0


def check_runtime_dir(runtime: Path) -> None:
    """Refuse a runtime dir that is a symlink, another user's, or reachable by others: whoever
    controls it could impersonate the daemon (notably with the /tmp/effectd-<uid> fallback).
    A missing one is fine (a daemon will create it)."""
    check_private_dir(runtime, RUNTIME_DIR, missing_ok=True)


def running_pid(runtime: Path) -> int | None:
    """The pid of the daemon holding the runtime dir's lock, or None if no daemon holds it."""
    return runtime_lock_pid(runtime)


def find_daemon(runtime: Path, state: Path) -> Path | None:
    """The runtime dir of the daemon serving ``state``, checked: ``runtime`` if a daemon holds
    it, else the one recorded by the daemon that holds ``state``'s lock, else None (none runs).
    The recorded dir may be missing for a moment (its daemon is restoring it)."""
    check_runtime_dir(runtime)
    if running_pid(runtime) is not None:
        return runtime
    check_private_dir(state, STATE_DIR, missing_ok=True)
    owner = state_owner(state)
    if owner is None:
        return None
    recorded = owner.get("runtime_dir")
    if not isinstance(recorded, str) or not recorded:
        return runtime  # it is starting and has not named its runtime dir yet: wait for it
    found = Path(recorded)
    check_runtime_dir(found)
    return found


def locate(runtime: Path, state: Path, *, autostart: bool) -> Path | None:
    """:func:`find_daemon`; when none runs and starting one is not allowed, DaemonUnavailable."""
    found = find_daemon(runtime, state)
    if found is None and not autostart:
        raise DaemonUnavailable(f"effectd is not running for {runtime} (autostart disabled)")
    return found


def went_away(exc: DaemonUnavailable, runtime: Path, state: Path) -> bool:
    """Whether a request that got no answer may start a new daemon and be sent once more: not
    through an unsafe runtime dir, nor while a daemon still holds the locks (it is only slow)."""
    return not isinstance(exc, UnsafeDirectory) and find_daemon(runtime, state) is None


def daemon_pid(runtime: Path, state: Path) -> int | None:
    """The pid of the daemon serving ``runtime``/``state`` (see :func:`find_daemon`), or None."""
    found = find_daemon(runtime, state)
    if found is None:
        return None
    pid = running_pid(found)
    if pid is None:  # its runtime dir is being restored: the state lock names it
        owner = state_owner(state) or {}
        pid = owner.get("pid") if isinstance(owner.get("pid"), int) else -1
    return pid


def log_tail(state: Path, lines: int = 15) -> str:
    try:
        text = (state / LOG_FILE).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def spawn_daemon(runtime: Path, state: Path, extra_args: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``effectd`` fully detached: new session, stdio to the log, no inherited descriptors."""
    ensure_private_dir(state, STATE_DIR)
    ensure_private_dir(runtime, RUNTIME_DIR)
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


def ensure_daemon(runtime: Path, state: Path, probe: Callable[[Path], bool],
                  timeout: float = DEFAULT_START_TIMEOUT) -> Path:
    """Start a daemon unless one serves ``state``, then wait until ``probe(runtime_dir)`` (a hello
    there) succeeds; returns that runtime dir (``runtime``, or the live daemon's own)."""
    proc: subprocess.Popen[bytes] | None = None
    target = find_daemon(runtime, state)
    if target is None:
        proc, target = spawn_daemon(runtime, state), runtime
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if probe(target):
            _reap_later(proc)
            return target
        if proc is not None:
            status = proc.poll()
            if status is not None and status != EXIT_ALREADY_RUNNING:
                raise DaemonUnavailable(
                    f"effectd failed to start (exit status {status}); last lines of "
                    f"{state / LOG_FILE}:\n{log_tail(state)}")
            if status == EXIT_ALREADY_RUNNING:
                proc = None  # another client's daemon won the race; wait for it
        if proc is None:
            found = find_daemon(runtime, state)
            if found is not None:
                target = found  # e.g. the winner of the race runs on another runtime dir
            elif time.monotonic() + 0.2 < deadline:
                proc, target = spawn_daemon(runtime, state), runtime  # the daemon we waited for died
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

