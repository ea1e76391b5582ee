"""Find and kill the *whole* process tree of one effect, without blocking the worker.

Why this module exists
----------------------
A worker process supervises several effect children at once.  Each child is
started with ``start_new_session=True`` and with ``EFFECTD_EFFECT_ID=<effect id>``
in its environment.  Cancelling an effect (or timing it out) must terminate
everything the effect started, and "everything" is harder to pin down than it
looks:

* killing the root pid leaves its children running;
* ``killpg`` of the root's process group misses anything that called
  ``setsid()``/``setpgid()`` -- which is exactly what daemons and
  ``setsid sleep 300 &`` do;
* walking ``children(recursive=True)`` misses double-forked processes whose
  intermediate parent has exited: they are reparented to the nearest *child
  subreaper* (the worker, once it called :func:`become_subreaper`) or to init,
  and are no longer below the root at all.

So an effect's processes are identified by the union of several independent
signals (see :func:`effect_processes`): the root (when its identity still
matches) and its descendants, every process of our uid whose environment
carries ``EFFECTD_EFFECT_ID == effect_id`` (the environment is inherited across
``fork``/``setsid``/double fork, which is how escapees are found even when we
are not their subreaper, e.g. a restarted daemon cleaning up after a dead
worker), the members of the root's session/process group, and the descendants
of all of those.

Safety rules
------------
* A pid alone never identifies a process: pids are recycled.  Processes are
  tracked as :class:`ProcessIdentity` (pid + psutil ``create_time``) and are only
  signalled after re-checking that identity.  On Linux the check is race free:
  a pidfd is opened first, the identity is verified *after* opening it, and the
  signal is sent through the pidfd, so a pid recycled between scan and signal
  is never hit.
* pid <= 1, our own pid, our ancestors, our own process group and our own
  session are never signalled.
* Zombies are never counted as alive, and killing never reaps: an exit
  status belongs to whoever owns the pid (a run's pidfd, a ``Popen``).  If a
  kill reaped a dead child, its owner's next ``waitpid`` would fail with
  ECHILD, which ``subprocess.Popen`` reports as exit code 0 -- a failed effect
  reported as succeeded.  Orphans adopted as subreaper are collected
  separately by :func:`reap_orphan_zombies`, which skips every owned pid.

Non-blocking kill
-----------------
The worker's I/O loop must never stall for seconds, so :class:`TreeKill` is a
two-phase state machine driven by the caller: :meth:`TreeKill.start` sends
SIGTERM (+ SIGCONT so stopped processes can act on it) and returns at once;
:meth:`TreeKill.poll` re-scans, terms newcomers, and after the grace period
SIGKILLs every survivor, re-scanning a few times per call because a dying parent
may still fork.  Each call costs one ``/proc`` pass plus reading the environment
of same-uid processes that were not seen before (results are cached per
identity).  :func:`kill_tree` is the blocking convenience for shutdown paths.

Limitations
-----------
* A process that *execs with a cleared/replaced environment* (``env -i``,
  ``execve(..., envp=NULL)``) cannot be found by marker.  It is still found when
  it is a descendant of any found process, or a member of the root's
  session/process group; a process that both clears its environment and escapes
  the tree and the session (e.g. ``setsid env -i cmd`` whose parent then exits)
  is not found -- except, by the worker, while it holds the effect's output
  pipes (:class:`PipeHolderKill`).  ``/proc/<pid>/environ`` shows the environment as of
  ``execve``; later ``setenv``/``unsetenv`` calls do not hide the marker.
* Processes of another uid (setuid programs) are only found through the
  descendant/session relations, and may not be killable (AccessDenied); the
  kill then does not complete and :func:`kill_tree` returns ``False``.
* Identities compare the wall-clock ``create_time`` psutil computes from the
  boot time; if the system clock is stepped so that the kernel's boot time
  changes, previously recorded identities stop matching.  That fails safe: the
  root is no longer matched by identity (it is still found by marker) and no
  wrong process is signalled.
* A process in uninterruptible sleep (``D`` state) survives SIGKILL until the
  kernel lets it go; :meth:`TreeKill.poll` keeps returning ``False`` meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

__all__ = [
    "DEFAULT_KILL_GRACE",
    "EFFECT_MARKER_ENV",
    "KILL_GIVE_UP",
    "PipeHolderKill",
    "ProcessIdentity",
    "TreeKill",
    "become_subreaper",
    "collect_exit_status",
    "effect_processes",
    "identity_of",
    "is_alive",
    "is_subreaper",
    "kill_tree",
    "pipe_holders",
    "reap_orphan_zombies",
]

#: Environment variable that tags every process of an effect (inherited by all
#: descendants, including setsid'd/double-forked ones).
EFFECT_MARKER_ENV = "EFFECTD_EFFECT_ID"

#: Seconds between SIGTERM and SIGKILL.  Long enough for well-behaved programs
#: to flush and exit, short enough that a cancel feels prompt.
DEFAULT_KILL_GRACE = 5.0

#: Two create times closer than this are considered equal.  psutil derives
#: create_time from the start time in clock ticks (1/100 s), so identical
#: processes compare exactly and distinct start ticks never compare equal.
CREATE_TIME_TOLERANCE = 0.005

#: SIGKILL/re-scan rounds per :meth:`TreeKill.poll` call in the kill phase.
MAX_KILL_ROUNDS = 8

#: Longest single wait in :func:`kill_tree`, so newly forked processes are
#: picked up by a re-scan promptly.
_WAIT_SLICE = 0.1

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

_DEAD_STATUSES = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


# --------------------------------------------------------------------------
# subreaper
# --------------------------------------------------------------------------


def _libc_prctl() -> Callable[..., int] | None:
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
    prctl = _libc_prctl()
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


def is_subreaper() -> bool:
    """Whether this process is currently a child subreaper (``False`` off Linux)."""
    prctl = _libc_prctl()
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    try:
        rc = prctl(
            ctypes.c_int(_PR_GET_CHILD_SUBREAPER),
            ctypes.byref(flag),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    except (OSError, ctypes.ArgumentError):
        return False
    return int(rc) == 0 and flag.value != 0


# --------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------


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


def _create_time_of(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError, ValueError):
        return None


def identity_of(pid: int) -> ProcessIdentity | None:
    """The identity of the process currently holding ``pid``, or ``None`` if none.

    A zombie still has an identity (its pid is not free yet); use
    :func:`is_alive` to ask whether it is running.
    """
    if pid <= 0:
        return None
    ct = _create_time_of(pid)
    return None if ct is None else ProcessIdentity(pid, ct)


def is_alive(ident: ProcessIdentity) -> bool:
    """True if ``ident.pid`` exists, has the same create_time, and is not a zombie."""
    if ident.pid <= 0:
        return False
    try:
        proc = psutil.Process(ident.pid)
        if not ident.matches(float(proc.create_time())):
            return False
        return proc.status() not in _DEAD_STATUSES
    except (psutil.Error, OSError, ValueError):
        return False


def _signallable(pid: int) -> bool:
    return pid > 1 and pid != os.getpid()


def _safe_group(gid: int) -> bool:
    """A pgid/sid we may target: not init's, not ours."""
    if gid <= 1:
        return False
    try:
        return gid not in (os.getpgid(0), os.getsid(0))
    except OSError:
        return False


def _send_signal(ident: ProcessIdentity, sig: int) -> bool:
    """Send ``sig`` to ``ident`` only if the pid still belongs to that process.

    Uses a pidfd when available so the identity check and the signal refer to
    the same process even if the pid is recycled in between.
    """
    if not _signallable(ident.pid):
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
        if not ident.matches(_create_time_of(ident.pid)):
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


def _killpg(pgid: int, sig: int) -> bool:
    if not _safe_group(pgid):
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# --------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------


@dataclass
class _Entry:
    proc: psutil.Process
    ppid: int
    uids: tuple[int, ...] | None
    dead: bool
    create_time: float | None


@dataclass
class _Snapshot:
    entries: dict[int, _Entry]
    children: dict[int, list[int]]

    def descendants(self, pid: int) -> list[int]:
        """Descendants of ``pid`` in breadth-first order (parents before children)."""
        out: list[int] = []
        queue = list(self.children.get(pid, ()))
        seen: set[int] = set()
        while queue:
            nxt: list[int] = []
            for child in queue:
                if child in seen:
                    continue
                seen.add(child)
                out.append(child)
                nxt.extend(self.children.get(child, ()))
            queue = nxt
        return out

    def ancestors(self, pid: int) -> set[int]:
        out: set[int] = set()
        entry = self.entries.get(pid)
        while entry is not None and entry.ppid > 0 and entry.ppid not in out:
            out.add(entry.ppid)
            entry = self.entries.get(entry.ppid)
        return out

    def identity(self, pid: int) -> ProcessIdentity | None:
        entry = self.entries.get(pid)
        if entry is None or entry.create_time is None:
            return None
        return ProcessIdentity(pid, entry.create_time)


def _snapshot() -> _Snapshot:
    entries: dict[int, _Entry] = {}
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid", "uids", "status", "create_time"], ad_value=None):
        info = proc.info
        ppid = info.get("ppid")
        uids = info.get("uids")
        ct = info.get("create_time")
        entry = _Entry(
            proc=proc,
            ppid=int(ppid) if ppid is not None else 0,
            uids=tuple(int(u) for u in uids) if uids is not None else None,
            dead=info.get("status") in _DEAD_STATUSES,
            create_time=float(ct) if ct is not None else None,
        )
        entries[proc.pid] = entry
        children.setdefault(entry.ppid, []).append(proc.pid)
    return _Snapshot(entries, children)


def _has_marker(proc: psutil.Process, effect_id: str) -> bool | None:
    """Whether ``proc`` carries the marker; ``None`` when that cannot be known now.

    An empty environment is reported as unknown: besides ``env -i`` it is what
    a process in the middle of ``execve`` shows, so it must not be cached.
    """
    try:
        env = proc.environ()
    except (psutil.Error, OSError, ValueError):
        return None
    if not env:
        return None
    return bool(env.get(EFFECT_MARKER_ENV) == effect_id)


def _owned_by_us(entry: _Entry) -> bool:
    uid = os.getuid()
    return entry.uids is not None and uid in entry.uids[:2]


def _in_group_of(pid: int, leader: int) -> bool:
    try:
        return os.getsid(pid) == leader or os.getpgid(pid) == leader
    except OSError:
        return False


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _leader_of(root: ProcessIdentity) -> int | None:
    """``root.pid`` if the (verified) root leads its own session or process group."""
    try:
        led = os.getsid(root.pid) == root.pid or os.getpgid(root.pid) == root.pid
    except OSError:
        return None
    # Re-check after the syscalls: the pid must still be our root.
    if led and _safe_group(root.pid) and root.matches(_create_time_of(root.pid)):
        return root.pid
    return None


def _collect(
    snap: _Snapshot,
    effect_id: str,
    root: ProcessIdentity | None,
    leader: int | None,
    marker_cache: dict[ProcessIdentity, bool] | None,
) -> list[psutil.Process]:
    me = os.getpid()
    excluded = {0, 1, me} | snap.ancestors(me)
    result: dict[int, psutil.Process] = {}

    def usable(pid: int) -> _Entry | None:
        entry = snap.entries.get(pid)
        if entry is None or entry.dead or pid in excluded:
            return None
        return entry

    def add_tree(pid: int) -> None:
        if pid in result or usable(pid) is None:
            return
        result[pid] = snap.entries[pid].proc
        for desc in snap.descendants(pid):
            entry = usable(desc)
            if entry is not None and desc not in result:
                result[desc] = entry.proc

    # 1. The root, if it is still the same process, and everything below it.
    if root is not None:
        entry = usable(root.pid)
        if entry is not None and root.matches(entry.create_time):
            add_tree(root.pid)

    # 2. Marker scan: our own descendants (orphans we adopted as subreaper)
    #    first, then every other process of our uid.
    mine = snap.descendants(me)
    mine_set = set(mine)
    order = mine + [pid for pid in snap.entries if pid not in mine_set]
    for pid in order:
        if pid in result:
            continue
        entry = usable(pid)
        if entry is None or not _owned_by_us(entry):
            continue
        ident = snap.identity(pid)
        hit: bool | None = None
        if marker_cache is not None and ident is not None:
            hit = marker_cache.get(ident)
        if hit is None:
            hit = _has_marker(entry.proc, effect_id)
            # Only definite answers are cached: the environment shown by /proc
            # changes only on execve, which keeps the identity, and an effect
            # process stays one after exec'ing with a different environment.
            if marker_cache is not None and ident is not None and hit is not None:
                marker_cache[ident] = hit
        if hit:
            add_tree(pid)

    # 3. Members of the root's session / process group (catches children that
    #    cleared their environment and lost their parent).  Only processes
    #    created after the root can be members of a group the root created.
    if leader is not None and _safe_group(leader):
        not_before = root.create_time - CREATE_TIME_TOLERANCE if root is not None else None
        for pid, entry in snap.entries.items():
            if pid in result or usable(pid) is None:
                continue
            if not_before is not None and (
                entry.create_time is None or entry.create_time < not_before
            ):
                continue
            if _in_group_of(pid, leader):
                add_tree(pid)

    return list(result.values())


def effect_processes(
    effect_id: str,
    root: ProcessIdentity | None = None,
    *,
    leader_pid: int | None = None,
) -> list[psutil.Process]:
    """Every live (non-zombie) process belonging to the effect.

    That is the union of: the root (only if its identity still matches) and
    its recursive children; every process owned by our uid whose environment
    carries ``EFFECTD_EFFECT_ID == effect_id`` (descendants of this process,
    i.e. orphans adopted while we are subreaper, are checked first, then all
    other processes of our uid, so escapees are found even when we are not
    their subreaper); members of the session/process group led by the root
    (when the root is alive and leads one, or ``leader_pid`` -- which the
    caller must have verified -- is given); and the descendants of all of
    those.  Within each subtree found, parents come before their children
    (so killing in order stops forkers before their offspring).

    Skips zombies, pid <= 1, this process and its ancestors, and tolerates
    processes vanishing or denying access during the scan.  See the module
    docstring for what cannot be found (processes that cleared their
    environment *and* left the tree and the session).
    """
    snap = _snapshot()
    leader = leader_pid
    if leader is None and root is not None:
        entry = snap.entries.get(root.pid)
        if entry is not None and root.matches(entry.create_time):
            leader = _leader_of(root)
    return _collect(snap, effect_id, root, leader, None)


# --------------------------------------------------------------------------
# reaping
# --------------------------------------------------------------------------


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
            if psutil.Process(pid).status() not in _DEAD_STATUSES:
                continue
            got, _status = os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, psutil.Error):
            continue
        if got == pid:
            reaped.append(pid)
    return reaped


# --------------------------------------------------------------------------
# killing
# --------------------------------------------------------------------------


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
        snap = _snapshot()
        procs = _collect(snap, self.effect_id, self.root, self._leader, self._marker_cache)
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
            if _send_signal(ident, signal.SIGTERM):
                # A stopped process cannot act on SIGTERM until continued.
                _send_signal(ident, signal.SIGCONT)

    # -- public ------------------------------------------------------------

    def start(self, now: float | None = None) -> None:
        """Send SIGTERM to the whole tree and arm the SIGKILL deadline. Idempotent."""
        if self._started:
            return
        self._started = True
        now = time.monotonic() if now is None else now
        self._deadline = now + self.grace
        if self.root is not None and self.root.matches(_create_time_of(self.root.pid)):
            # A zombie root still pins its session/group id, so it counts here.
            self._leader = _leader_of(self.root)
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
                and self.root.matches(_create_time_of(self.root.pid))
                and _killpg(self._leader, signal.SIGTERM)
            ):
                _killpg(self._leader, signal.SIGCONT)
                for ident in idents:
                    if _pgid_of(ident.pid) == self._leader:
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
                _send_signal(ident, signal.SIGKILL)
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


def pipe_holders(inodes: Iterable[int]) -> list[tuple[ProcessIdentity, bool]]:
    """Live processes other than this one with a descriptor on one of the pipes ``inodes``, each
    with whether it runs as our uid (only those are ever signalled).

    One ``/proc`` pass reading every visible process's fd table: meant for the rare case of an
    effect whose tree is gone while its output pipes stay open. Processes whose fd table we may
    not read (another user's, when not root) are not found."""
    targets = {f"pipe:[{ino}]" for ino in inodes}
    me = os.getpid()
    found: list[tuple[ProcessIdentity, bool]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or not _signallable(int(name)) or int(name) == me:
            continue
        pid = int(name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to look at
        holds = False
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    holds = True
                    break
        if not holds:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.status() in _DEAD_STATUSES:
                continue
            ident = ProcessIdentity(pid, float(proc.create_time()))
            mine = os.getuid() in proc.uids()[:2]
        except (psutil.Error, OSError, ValueError):
            continue
        found.append((ident, mine))
    return found


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
                _send_signal(ident, signal.SIGKILL)
            elif ident not in self._termed:
                self._termed.add(ident)
                if _send_signal(ident, signal.SIGTERM):
                    _send_signal(ident, signal.SIGCONT)
        return False


def _wait_pidfds(pids: Iterable[int], timeout: float) -> None:
    """Wait until one of ``pids`` exits or ``timeout`` passes, without reaping."""
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
        if fds:
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
            _wait_pidfds((p.pid for p in tk.survivors), max(slice_, 0.001))
        else:  # pragma: no cover - no pidfds: bounded back-off before re-scanning
            time.sleep(max(slice_, 0.001))
