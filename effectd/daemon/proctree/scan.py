"""Finding every process of one effect (tree, marker, session, group) and who holds its pipes.

See :mod:`effectd.daemon.proctree` for how an effect's processes are identified and what cannot be found.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from effectd.daemon.proctree.identity import (
    CREATE_TIME_TOLERANCE,
    DEAD_STATUSES,
    EFFECT_MARKER_ENV,
    ProcessIdentity,
    create_time_of,
    safe_group,
    signallable,
)


@dataclass
class Entry:
    proc: psutil.Process
    ppid: int
    uids: tuple[int, ...] | None
    dead: bool
    create_time: float | None


@dataclass
class Snapshot:
    entries: dict[int, Entry]
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


def snapshot() -> Snapshot:
    entries: dict[int, Entry] = {}
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid", "uids", "status", "create_time"], ad_value=None):
        info = proc.info
        ppid = info.get("ppid")
        uids = info.get("uids")
        ct = info.get("create_time")
        entry = Entry(
            proc=proc,
            ppid=int(ppid) if ppid is not None else 0,
            uids=tuple(int(u) for u in uids) if uids is not None else None,
            dead=info.get("status") in DEAD_STATUSES,
            create_time=float(ct) if ct is not None else None,
        )
        entries[proc.pid] = entry
        children.setdefault(entry.ppid, []).append(proc.pid)
    return Snapshot(entries, children)


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


def _owned_by_us(entry: Entry) -> bool:
    uid = os.getuid()
    return entry.uids is not None and uid in entry.uids[:2]


def _in_group_of(pid: int, leader: int) -> bool:
    try:
        return os.getsid(pid) == leader or os.getpgid(pid) == leader
    except OSError:
        return False


def pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def leader_of(root: ProcessIdentity) -> int | None:
    """``root.pid`` if the (verified) root leads its own session or process group."""
    try:
        led = os.getsid(root.pid) == root.pid or os.getpgid(root.pid) == root.pid
    except OSError:
        return None
    # Re-check after the syscalls: the pid must still be our root.
    if led and safe_group(root.pid) and root.matches(create_time_of(root.pid)):
        return root.pid
    return None


def collect_effect(
    snap: Snapshot,
    effect_id: str,
    root: ProcessIdentity | None,
    leader: int | None,
    marker_cache: dict[ProcessIdentity, bool] | None,
) -> list[psutil.Process]:
    me = os.getpid()
    excluded = {0, 1, me} | snap.ancestors(me)
    result: dict[int, psutil.Process] = {}

    def usable(pid: int) -> Entry | None:
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
    if leader is not None and safe_group(leader):
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
    snap = snapshot()
    leader = leader_pid
    if leader is None and root is not None:
        entry = snap.entries.get(root.pid)
        if entry is not None and root.matches(entry.create_time):
            leader = leader_of(root)
    return collect_effect(snap, effect_id, root, leader, None)


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
        if not name.isdigit() or not signallable(int(name)) or int(name) == me:
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
            if proc.status() in DEAD_STATUSES:
                continue
            ident = ProcessIdentity(pid, float(proc.create_time()))
            mine = os.getuid() in proc.uids()[:2]
        except (psutil.Error, OSError, ValueError):
            continue
        found.append((ident, mine))
    return found
