"""One daemon per runtime dir: an flock on ``effectd.lock``, taken before any socket is bound.

Also refuses directories another user owns or that group/others can write: whoever can reach
the control socket can run commands as the daemon's user.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path

from effectd.ipc.endpoints import LOCK_FILE

PROBE_PATIENCE = 1.0
"""Seconds a starting daemon waits for a client's probing (shared) lock to go away."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None, runtime: Path) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"effectd is already running for {runtime} ({who})")


class UnsafeDirectory(Exception):
    pass


def ensure_private_dir(path: Path, what: str) -> None:
    """Create ``path`` mode 0700, or check an existing one is ours and not group/other-writable."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(
            f"{what} {path} is owned by uid {st.st_uid}, not by us (uid {os.getuid()}); refusing to start"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 700 {path}` or choose another directory"
        )


def read_pid(runtime: Path) -> int | None:
    try:
        text = (runtime / LOCK_FILE).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class RuntimeLock:
    def __init__(self, runtime: Path) -> None:
        self.path = runtime / LOCK_FILE
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + PROBE_PATIENCE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = read_pid(self.path.parent)
                # Clients probe for a daemon with a brief shared lock; only a lock file naming
                # a live process means a daemon really runs. Otherwise wait the probe out.
                if (pid is not None and _alive(pid)) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise AlreadyRunning(pid, self.path.parent) from None
                time.sleep(0.005)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1
