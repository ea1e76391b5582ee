"""Processes as identities (pid + create time) and the only ways effectd signals them.

A pid alone never identifies a process: pids are recycled. A :class:`ProcessIdentity` is checked
again right before each signal, through a pidfd when there is one, and some pids, groups and
sessions (init, ours, our ancestors') are never signalled at all. See :mod:`effectd.daemon.proctree`.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import psutil

#: Environment variable that tags every process of an effect (inherited by all
#: descendants, including setsid'd/double-forked ones).
EFFECT_MARKER_ENV = "EFFECTD_EFFECT_ID"

#: Two create times closer than this are considered equal.  psutil derives
#: create_time from the start time in clock ticks (1/100 s), so identical
#: processes compare exactly and distinct start ticks never compare equal.
CREATE_TIME_TOLERANCE = 0.005

DEAD_STATUSES = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as (pid, creation time): a recycled pid has a different create_time."""

    pid: int
    create_time: float

    def matches(self, create_time: float | None) -> bool:
        """Whether ``create_time`` (of the process now holding :attr:`pid`) is ours."""
        return create_time is not None and abs(create_time - self.create_time) < (
            CREATE_TIME_TOLERANCE
        )


def create_time_of(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError, ValueError):
        return None


def is_alive(ident: ProcessIdentity) -> bool:
    """True if ``ident.pid`` exists, has the same create_time, and is not a zombie."""
    if ident.pid <= 0:
        return False
    try:
        proc = psutil.Process(ident.pid)
        if not ident.matches(float(proc.create_time())):
            return False
        return proc.status() not in DEAD_STATUSES
    except (psutil.Error, OSError, ValueError):
        return False


def signallable(pid: int) -> bool:
    return pid > 1 and pid != os.getpid()


def safe_group(gid: int) -> bool:
    """A pgid/sid we may target: not init's, not ours."""
    if gid <= 1:
        return False
    try:
        return gid not in (os.getpgid(0), os.getsid(0))
    except OSError:
        return False


def send_signal(ident: ProcessIdentity, sig: int) -> bool:
    """Send ``sig`` to ``ident`` only if the pid still belongs to that process.

    Uses a pidfd when available so the identity check and the signal refer to
    the same process even if the pid is recycled in between.
    """
    if not signallable(ident.pid):
        return False
    fd: int | None = None
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            fd = os.pidfd_open(ident.pid)
        except ProcessLookupError:
            return False
        except OSError:
            fd = None  # e.g. ENOSYS under seccomp: fall back to kill(2)
    try:
        if not ident.matches(create_time_of(ident.pid)):
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(ident.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if fd is not None:
            os.close(fd)


def killpg(pgid: int, sig: int) -> bool:
    if not safe_group(pgid):
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
