"""Process-tree helpers only the tests use (moved out of effectd.daemon.proctree).

Imported by test modules and by the stand-in worker tests/misbehaving/worker.py.
"""

from __future__ import annotations

import ctypes
import os
import select
import time
from collections.abc import Iterable

from effectd.daemon.proctree import DEFAULT_KILL_GRACE, ProcessIdentity, TreeKill
from effectd.daemon.proctree.identity import create_time_of
from effectd.daemon.proctree.reaping import libc_prctl

PR_GET_CHILD_SUBREAPER = 37

#: Longest single wait in :func:`kill_tree`, so newly forked processes are
#: picked up by a re-scan promptly.
_WAIT_SLICE = 0.1


def identity_of(pid: int) -> ProcessIdentity | None:
    """The identity of the process currently holding ``pid``, or ``None`` if none.

    A zombie still has an identity (its pid is not free yet); use
    :func:`is_alive` to ask whether it is running.
    """
    if pid <= 0:
        return None
    ct = create_time_of(pid)
    return None if ct is None else ProcessIdentity(pid, ct)


def is_subreaper() -> bool:
    """Whether this process is currently a child subreaper (``False`` off Linux)."""
    prctl = libc_prctl()
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    try:
        rc = prctl(
            ctypes.c_int(PR_GET_CHILD_SUBREAPER),
            ctypes.byref(flag),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    except (OSError, ctypes.ArgumentError):
        return False
    return int(rc) == 0 and flag.value != 0


def wait_any(pids: Iterable[int], timeout: float) -> None:
    """Wait until one of ``pids`` exits or ``timeout`` passes, without reaping (a pidfd each);
    returns at once if one is gone already."""
    fds: list[int] = []
    try:
        poller = select.poll()
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                return  # gone already (or no pidfd support): re-scan now
            fds.append(fd)
            poller.register(fd, select.POLLIN)
        poller.poll(max(0, int(timeout * 1000)))
    finally:
        for fd in fds:
            os.close(fd)


def kill_tree(
    effect_id: str,
    root: ProcessIdentity | None,
    grace: float = DEFAULT_KILL_GRACE,
    timeout: float = 30.0,
) -> bool:
    """Blocking convenience: kill the effect's tree, ``True`` once all of it is gone.

    Drives a :class:`TreeKill` and waits between polls on the survivors'
    pidfds (short slices, so newly forked processes are picked up) -- never
    with ``psutil.wait_procs``, which reaps our children and would steal their
    exit statuses from their owners.  Returns ``False`` if something is still
    alive after ``timeout`` seconds.
    """
    tk = TreeKill(effect_id, root, grace)
    end = time.monotonic() + max(0.0, timeout)
    tk.start()
    while True:
        now = time.monotonic()
        if tk.poll(now):
            return True
        if now >= end:
            return False
        slice_ = min(end - now, _WAIT_SLICE)
        deadline = tk.deadline
        if deadline is not None and now < deadline:
            slice_ = min(slice_, deadline - now)
        if hasattr(os, "pidfd_open"):
            wait_any((p.pid for p in tk.survivors), max(slice_, 0.001))
        else:  # pragma: no cover - no pidfds: bounded back-off before re-scanning
            time.sleep(max(slice_, 0.001))
