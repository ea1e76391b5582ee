"""Killing one effect's process tree without blocking the caller: :class:`TreeKill` and
:class:`PipeHolderKill`, two-phase state machines the worker drives from its loop.
See :mod:`effectd.daemon.proctree`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

import psutil

from effectd.daemon.proctree.identity import ProcessIdentity, create_time_of, killpg, send_signal
from effectd.daemon.proctree.scan import collect_effect, leader_of, pgid_of, pipe_holders, snapshot

#: Seconds between SIGTERM and SIGKILL.  Long enough for well-behaved programs
#: to flush and exit, short enough that a cancel feels prompt.
DEFAULT_KILL_GRACE = 5.0

#: SIGKILL/re-scan rounds per :meth:`TreeKill.poll` call in the kill phase.
MAX_KILL_ROUNDS = 8


def _identity_of_proc(proc: psutil.Process) -> ProcessIdentity | None:
    try:
        return ProcessIdentity(proc.pid, float(proc.create_time()))
    except (psutil.Error, OSError, ValueError):
        return None


class TreeKill:
    """Two-phase, non-blocking kill of one effect's process tree.

    :meth:`start` SIGTERMs (then SIGCONTs) every process of the effect and the
    root's process group, and sets ``deadline = now + grace``.  The caller then
    calls :meth:`poll` from its loop: it re-scans, SIGTERMs processes that
    appeared since, and returns ``True`` once nothing is left.  After the
    deadline it SIGKILLs all survivors, re-scanning up to
    :data:`MAX_KILL_ROUNDS` times per call (a dying parent may fork), and keeps
    returning ``False`` until everything is gone -- or, with ``give_up_after``,
    until that many seconds past the deadline, when it stops and counts the
    survivors in :attr:`leaked` (a process of another uid, or one in
    uninterruptible sleep, may never go).  Neither method sleeps, and neither
    reaps: zombies already count as gone, and their exit statuses are left to
    their owners (see the module docstring).
    """

    def __init__(
        self,
        effect_id: str,
        root: ProcessIdentity | None,
        grace: float = DEFAULT_KILL_GRACE,
        give_up_after: float | None = None,
    ) -> None:
        self.effect_id = effect_id
        self.root = root
        self.grace = max(0.0, float(grace))
        self.give_up_after = give_up_after
        self.leaked = 0  #: survivors when the kill gave up (see ``give_up_after``)
        self._leader: int | None = None
        self._deadline: float | None = None
        self._started = False
        self._done = False
        self._termed: set[ProcessIdentity] = set()
        self._seen: dict[ProcessIdentity, None] = {}
        self._marker_cache: dict[ProcessIdentity, bool] = {}
        self._survivors: list[psutil.Process] = []
        self.killed = False  #: whether the SIGKILL phase was entered

    # -- introspection -----------------------------------------------------

    @property
    def done(self) -> bool:
        """True once a :meth:`poll` found no live process of the effect."""
        return self._done

    @property
    def started(self) -> bool:
        return self._started

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` value after which survivors get SIGKILL."""
        return self._deadline

    @property
    def seen(self) -> list[ProcessIdentity]:
        """Every process identity this kill has targeted, in discovery order."""
        return list(self._seen)

    @property
    def survivors(self) -> list[psutil.Process]:
        """Live processes found by the latest scan."""
        return list(self._survivors)

    # -- internals ---------------------------------------------------------

    def _scan(self) -> list[ProcessIdentity]:
        snap = snapshot()
        procs = collect_effect(snap, self.effect_id, self.root, self._leader, self._marker_cache)
        self._survivors = procs
        idents: list[ProcessIdentity] = []
        for proc in procs:
            ident = _identity_of_proc(proc)
            if ident is not None:
                idents.append(ident)
                self._seen.setdefault(ident, None)
        return idents

    def _term(self, idents: Iterable[ProcessIdentity]) -> None:
        for ident in idents:
            if ident in self._termed:
                continue
            self._termed.add(ident)
            if send_signal(ident, signal.SIGTERM):
                # A stopped process cannot act on SIGTERM until continued.
                send_signal(ident, signal.SIGCONT)

    # -- public ------------------------------------------------------------

    def start(self, now: float | None = None) -> None:
        """Send SIGTERM to the whole tree and arm the SIGKILL deadline. Idempotent."""
        if self._started:
            return
        self._started = True
        now = time.monotonic() if now is None else now
        self._deadline = now + self.grace
        if self.root is not None and self.root.matches(create_time_of(self.root.pid)):
            # A zombie root still pins its session/group id, so it counts here.
            self._leader = leader_of(self.root)
        idents = self._scan()
        if self._leader is not None:
            try:
                is_pg = os.getpgid(self._leader) == self._leader
            except OSError:
                is_pg = False
            # The group signal also reaches members that joined since the scan;
            # members already scanned must not get a second SIGTERM (many
            # programs treat a repeated SIGTERM as "exit now").
            if (
                is_pg
                and self.root is not None
                and self.root.matches(create_time_of(self.root.pid))
                and killpg(self._leader, signal.SIGTERM)
            ):
                killpg(self._leader, signal.SIGCONT)
                for ident in idents:
                    if pgid_of(ident.pid) == self._leader:
                        self._termed.add(ident)
        self._term(idents)

    def poll(self, now: float | None = None) -> bool:
        """Advance the kill; ``True`` once every process of the effect is gone."""
        if self._done:
            return True
        if not self._started:
            self.start(now)
        now = time.monotonic() if now is None else now
        idents = self._scan()
        if not idents:
            self._done = True
            return True
        assert self._deadline is not None
        if now < self._deadline:
            self._term(idents)
            return False
        self.killed = True
        for _ in range(MAX_KILL_ROUNDS):
            for ident in idents:
                send_signal(ident, signal.SIGKILL)
            before = set(idents)
            idents = self._scan()
            if not idents:
                self._done = True
                return True
            if before.issuperset(idents):
                break  # nothing new: the rest is just still dying
        if self.give_up_after is not None and now >= self._deadline + self.give_up_after:
            self.leaked = len(idents)
            self._done = True
            return True
        return False


#: Seconds past the SIGKILL deadline after which a worker's kill stops waiting and reports the
#: survivors as leaked: a killable process is gone within milliseconds of SIGKILL.
KILL_GIVE_UP = 0.5


class PipeHolderKill:
    """Kill what still holds an effect's output pipes once its tree kill found nothing left.

    Such processes escaped the tree, the session and the marker (``setsid env -i``, the
    documented gap of :func:`effect_processes`) but inherited the pipes, which they would keep
    open -- and the effect unfinished -- for as long as they live. Same two phases as
    :class:`TreeKill` (SIGTERM + SIGCONT now, SIGKILL from ``kill_at``), never signalling another
    uid's processes. :meth:`poll` returns ``True`` once no holder we may kill is left, or
    :data:`KILL_GIVE_UP` after ``kill_at``; :attr:`leaked` then counts the holders still alive.
    Pids in ``ignore`` (survivors a tree kill already gave up on and counted) are left out.
    """

    def __init__(self, inodes: Iterable[int], kill_at: float, ignore: Iterable[int] = ()) -> None:
        self.inodes = frozenset(inodes)
        self.kill_at = kill_at
        self.ignore = frozenset(ignore)
        self.done = False
        self.leaked = 0
        self._termed: set[ProcessIdentity] = set()

    def poll(self, now: float) -> bool:
        if self.done:
            return True
        holders = [(ident, mine) for ident, mine in pipe_holders(self.inodes) if ident.pid not in self.ignore]
        ours = [ident for ident, mine in holders if mine]
        self.leaked = len(holders)
        if not ours or now >= self.kill_at + KILL_GIVE_UP:
            self.done = True
            return True
        for ident in ours:
            if now >= self.kill_at:
                send_signal(ident, signal.SIGKILL)
            elif ident not in self._termed:
                self._termed.add(ident)
                if send_signal(ident, signal.SIGTERM):
                    send_signal(ident, signal.SIGCONT)
        return False
