"""Private directories and the locks in them: one set of checks for the daemon, workers and clients.

Whoever can reach the runtime dir can talk to the daemon (and run commands as its user), or
impersonate it to workers and clients; whoever can write the state dir can rewrite the journal.
So both must be ours and closed to others, and they are checked with ``lstat``: a symlink planted
at the path by another user (``/tmp/effectd-<uid>`` is in a world-writable dir) would pass a
``stat`` through it, and could later be re-pointed at that user's own directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from effectd.ipc.endpoints import LOCK_FILE, STATE_LOCK_FILE
from effectd.ipc.errors import UnsafeDirectory
from effectd.ipc.flock import lock_holder

RUNTIME_DIR = "runtime dir"
STATE_DIR = "state dir"

_FORBIDDEN_BITS = {RUNTIME_DIR: 0o077, STATE_DIR: 0o022}
"""Mode bits refused: the runtime dir must be 0700; the state dir must not be writable by others
(a 0755 state dir of an older install is accepted: reading it needs the files' 0600 anyway)."""


def check_private_dir(path: Path, what: str, *, missing_ok: bool = False) -> os.stat_result | None:
    """Refuse ``path`` unless it is a real directory (not a symlink), owned by us, and closed to
    group/others (``what`` is :data:`RUNTIME_DIR` or :data:`STATE_DIR`). Returns its lstat, or
    None if it does not exist and ``missing_ok``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UnsafeDirectory(f"{what} {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"refusing {what} {path}: it is a symlink (to {_readlink(path)}); "
                              f"remove it, or set a private dir with EFFECTD_RUNTIME_DIR/EFFECTD_STATE_DIR")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"refusing {what} {path}: it is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(f"refusing {what} {path}: it is owned by uid {st.st_uid}, not by us "
                              f"(uid {os.getuid()})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & _FORBIDDEN_BITS.get(what, 0o022):
        how = "writable" if mode & 0o022 else "accessible"
        raise UnsafeDirectory(f"refusing {what} {path}: it is {how} by group or others (mode {mode:o}); "
                              f"run `chmod 700 {path}` or choose another directory")
    return st


def ensure_private_dir(path: Path, what: str) -> os.stat_result:
    """Create ``path`` mode 0700 (its parents as usual), or accept an existing one that passes
    :func:`check_private_dir`. ``mkdir`` never follows a symlink at ``path``; the lstat after it
    judges whatever is there, whoever made it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = check_private_dir(path, what)
    assert st is not None
    return st


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


# ---- locks ----------------------------------------------------------------------------------


def holder_pid(text: str) -> int | None:
    """The pid in a lock file's text: a bare number (runtime lock) or the ``pid`` of a JSON
    record (state lock). None while the holder has not written it yet."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    info = parse_owner(text)
    pid = info.get("pid")
    return pid if isinstance(pid, int) and pid > 0 else None


def parse_owner(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def runtime_lock_pid(runtime: Path) -> int | None:
    """The pid of the daemon holding the runtime dir's lock (-1: held, pid not written yet), or
    None if no daemon holds it."""
    text = lock_holder(runtime / LOCK_FILE)
    if text is None:
        return None
    pid = holder_pid(text)
    return -1 if pid is None else pid


def state_owner(state: Path) -> dict[str, Any] | None:
    """The record of the daemon that holds the state dir's lock (``{pid, runtime_dir, instance,
    started}``; empty while it starts), or None if no daemon owns this journal."""
    text = lock_holder(state / STATE_LOCK_FILE)
    return None if text is None else parse_owner(text)


def pin_dir(path: Path, what: str) -> tuple[int, Path]:
    """Check ``path`` and open it (``O_PATH``); returns the fd and ``/proc/self/fd/<fd>``.

    Sockets connected through that path reach this very directory whatever is put at ``path``
    later, so zmq's own automatic reconnects (which resolve the path again, outside our code)
    never follow a swapped or planted one. Without /proc the fd is -1 and the plain path is
    returned (checked here, not pinned)."""
    st = check_private_dir(path, what)
    assert st is not None
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafeDirectory(f"cannot open {what} {path}: {exc}") from exc
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise UnsafeDirectory(f"refusing {what} {path}: it was replaced while being checked")
    via = Path(f"/proc/self/fd/{fd}")
    if not via.is_dir():
        os.close(fd)
        return -1, path
    return fd, via
