"""How a shell effect's process is spawned: its progress pipe on fd 3 and its rlimits.

Shell effects report progress by writing lines to fd 3. The worker keeps its own fd 3 reserved
(a :class:`ProgressFd` it owns and hands to each shell run), so a spawn can point it at the
effect's progress pipe in the parent and pass it with ``pass_fds``; that avoids ``preexec_fn``,
which forces a full fork and runs Python in the child (about 3 ms per spawn). Shells such as dash
cannot redirect to fds above 9, hence fd 3 and not any free one.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Callable
from typing import Any

PROGRESS_CHILD_FD = 3
PROGRESS_ENV = "EFFECTD_PROGRESS_FD"
"""Shell effects report progress by writing lines ``<fraction> <message>`` (fraction 0..1, or
``-`` for none) to file descriptor 3, which this variable names: ``echo "0.5 halfway" >&3``."""
MAX_PROGRESS_LINE = 4096


class ProgressFd:
    """The worker's fd 3, held on /dev/null between spawns; or, when fd 3 was already taken at
    start, nothing (``reserved`` is False and spawns fall back to ``preexec_fn``)."""

    def __init__(self, slot: int = -1) -> None:
        self._slot = slot  # an fd holding /dev/null, kept to restore fd 3 after each spawn

    @classmethod
    def reserve(cls) -> ProgressFd:
        """Called once at worker start, while fd 3 is still free (before zmq opens descriptors)."""
        try:
            os.fstat(PROGRESS_CHILD_FD)
            return cls()  # already taken by something else: fall back to preexec_fn
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if devnull == PROGRESS_CHILD_FD:  # the lowest free fd: keep it, and a copy to restore from
            return cls(os.dup(devnull))
        os.dup2(devnull, PROGRESS_CHILD_FD, inheritable=False)
        return cls(devnull)

    @property
    def reserved(self) -> bool:
        return self._slot >= 0

    def popen(self, argv: list[str], progress_w: int, limits: dict[str, int] | None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` with ``progress_w`` as its fd 3 and ``limits`` applied; ``kwargs`` go to Popen."""
        reserved = self.reserved
        try:
            if reserved:
                os.dup2(progress_w, PROGRESS_CHILD_FD, inheritable=True)
            return subprocess.Popen(
                argv, pass_fds=(PROGRESS_CHILD_FD,) if reserved else (progress_w, PROGRESS_CHILD_FD),
                preexec_fn=_child_setup(None if reserved else progress_w, limits), **kwargs)
        finally:
            if reserved:
                os.dup2(self._slot, PROGRESS_CHILD_FD, inheritable=False)


def _child_setup(progress_fd: int | None, limits: dict[str, int] | None) -> Callable[[], None] | None:
    """What must run in the child between fork and exec: the progress pipe onto fd 3 when fd 3
    could not be reserved, and the effect's rlimits. None when there is nothing to do."""
    if progress_fd is None and not limits:
        return None
    names = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU, "nofile": resource.RLIMIT_NOFILE}

    def apply() -> None:
        if progress_fd is not None:
            os.dup2(progress_fd, PROGRESS_CHILD_FD, inheritable=True)
        for key, value in (limits or {}).items():
            # CPU: the hard limit one second above the soft one, so the soft limit's SIGXCPU
            # (a clear "cpu time limit") arrives before the hard limit's SIGKILL.
            hard = value + 1 if key == "cpu" else value
            resource.setrlimit(names[key], (value, hard))

    return apply


def parse_progress_line(line: bytes) -> tuple[float | None, str | None] | None:
    """One line written to fd 3: ``(fraction, message)``, or None for a blank line."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    head, _, rest = text.partition(" ")
    try:
        fraction: float | None = None if head == "-" else min(1.0, max(0.0, float(head)))
    except ValueError:
        return None, text[:MAX_PROGRESS_LINE]
    if fraction is not None and fraction != fraction:  # NaN
        fraction = None
    return fraction, (rest[:MAX_PROGRESS_LINE] or None)
