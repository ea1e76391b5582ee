"""Exit statuses: becoming a child subreaper, and reaping only what nobody else owns.

Killing never reaps (an exit status belongs to whoever owns the pid); orphans adopted as subreaper
are collected here, skipping every owned pid. See :mod:`effectd.daemon.proctree`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

import psutil

from effectd.daemon.proctree.identity import DEAD_STATUSES

_PR_SET_CHILD_SUBREAPER = 36


def libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The interpreter is linked against libc, so its own symbol table has
        # prctl; this avoids ctypes.util.find_library, which spawns ldconfig.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        try:
            prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        except (OSError, AttributeError):
            return None
    prctl.restype = ctypes.c_int
    return prctl


def become_subreaper() -> bool:
    """Make this process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER, 1)``).

    Orphaned descendants are then reparented to us instead of init, so they
    stay visible below us and their zombies can be reaped by
    :func:`reap_orphan_zombies`.  Returns ``False`` (without raising) on
    non-Linux platforms or when the call fails.
    """
    prctl = libc_prctl()
    if prctl is None:
        return False
    try:
        rc = prctl(
            ctypes.c_int(_PR_SET_CHILD_SUBREAPER),
            ctypes.c_ulong(1),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    except (OSError, ctypes.ArgumentError):
        return False
    return int(rc) == 0


def own_children() -> list[int]:
    """Pids of this process's children, from /proc/self/task/*/children (one small read per
    thread) rather than psutil's scan of every process on the machine."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return [p.pid for p in psutil.Process().children(recursive=False)]
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return pids


def collect_exit_status(pid: int, pidfd: int = -1) -> tuple[bool, int | None]:
    """Reap our child ``pid`` -- only it -- if it has exited, without blocking.

    Returns ``(False, None)`` while it runs, ``(True, status)`` once collected
    (the exit code, or ``-signal`` like ``Popen.returncode``), and ``(True,
    None)`` when its status can no longer be known (ECHILD: someone else
    reaped it).  Through the pidfd when there is one, so the wait cannot hit
    another process that recycled the pid.
    """
    try:
        if pidfd >= 0:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            if info is None:
                return False, None
            if info.si_code == os.CLD_EXITED:
                return True, int(info.si_status)
            return True, -int(info.si_status)  # CLD_KILLED or CLD_DUMPED: si_status is the signal
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True, None
    if got == 0:
        return False, None
    return True, os.waitstatus_to_exitcode(status)


def reap_orphan_zombies(protected_pids: set[int]) -> list[int]:
    """Reap zombie children of this process that are not in ``protected_pids``.

    These are typically orphans adopted as subreaper.  Besides the owners of
    pids (:func:`collect_exit_status`), this is the only reaper: the caller must
    put in ``protected_pids`` every pid whose exit status someone still wants,
    and must not call it at all while code it does not control may start
    children (a python effect's own subprocesses).  Uses ``waitpid(pid,
    WNOHANG)`` on specific pids, never ``waitpid(-1)``.  Returns the reaped pids.
    """
    # Only our own children can be reaped, so list them (cheap: /proc/self/task/*/children)
    # instead of scanning every process on the machine.
    reaped: list[int] = []
    for pid in own_children():
        if pid in protected_pids or pid <= 0:
            continue
        try:
            if psutil.Process(pid).status() not in DEAD_STATUSES:
                continue
            got, _status = os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, psutil.Error):
            continue
        if got == pid:
            reaped.append(pid)
    return reaped
