"""The one flock helper: whoever holds a lock file, and taking one without waiting.

A lock file's text names its holder (a pid, or a JSON record with one). Used by the daemon's
runtime and state locks (:mod:`effectd.daemon.lock`), by clients asking whether a daemon runs
(:mod:`effectd.ipc.dirs`), and by the babysitter driver (one driver per run).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from effectd.ipc.errors import UnsafeDirectory

MAX_HOLDER_TEXT = 4096


def try_lock(path: Path) -> tuple[int | None, str]:
    """Take an exclusive flock on ``path`` (created 0600, never through a symlink) without
    waiting: ``(fd, "")`` when taken (keep the fd open to hold it), else ``(None, the holder's
    text)``. OSError if the file cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return None, os.pread(fd, MAX_HOLDER_TEXT, 0).decode(errors="replace")
        finally:
            os.close(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, ""


def write_holder(fd: int, text: str) -> None:
    """Replace the text of the lock file we hold on ``fd``."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def lock_holder(path: Path) -> str | None:
    """The text of lock file ``path`` if a process holds its flock, else None (a stale file or
    none). Probes with a brief shared lock, which a starting daemon waits out."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise UnsafeDirectory(f"cannot open the lock {path}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, MAX_HOLDER_TEXT, 0).decode(errors="replace")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
