"""One daemon per journal and per runtime dir: flocks held for the daemon's whole life.

* ``<state>/daemon.json`` - the journal's owner. Taken first: two daemons on one journal would
  run effects twice and overwrite final states, whatever runtime dirs they use. Its text names
  the owner (pid, runtime dir, instance, start time) for clients whose runtime dir is empty.
* ``<runtime>/effectd.lock`` - taken before any socket is bound, because a second ipc bind
  silently steals the endpoint from the first daemon. Contains the pid.

The directories themselves are checked by :mod:`effectd.ipc.dirs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from effectd.ipc.dirs import holder_pid, parse_owner
from effectd.ipc.endpoints import LOCK_FILE, STATE_LOCK_FILE
from effectd.ipc.flock import try_lock, write_holder

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
    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class FileLock:
    """An exclusive flock on ``path``, kept open until :meth:`release`; its text names the holder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def acquire(self, text: str) -> None:
        """Take the lock and write ``text`` into the file, or raise :class:`AlreadyRunning`."""
        deadline = time.monotonic() + PROBE_PATIENCE
        while True:
            fd, held = try_lock(self.path)
            if fd is not None:
                break
            pid = holder_pid(held)
            # Clients probe with a brief shared lock; only a file naming a live process means
            # a daemon really holds it. Otherwise wait the probe out.
            if (pid is not None and _alive(pid)) or time.monotonic() >= deadline:
                raise AlreadyRunning(self.refusal(pid, held), pid)
            time.sleep(0.005)
        self.fd = fd
        self.write(text)

    def write(self, text: str) -> None:
        write_holder(self.fd, text)

    def refusal(self, pid: int | None, held: str) -> str:
        who = f"pid {pid}" if pid else "another process"
        return f"effectd is already running for {self.path.parent} ({who})"

    def still_ours(self) -> bool:
        """Whether the file at the path is still the one we hold locked. False once it (or its
        dir) was removed or replaced: nobody can see our lock any more."""
        if self.fd < 0:
            return False
        try:
            at_path = os.lstat(self.path)
        except OSError:
            return False
        held = os.fstat(self.fd)
        return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


class RuntimeLock(FileLock):
    def __init__(self, runtime: Path) -> None:
        super().__init__(runtime / LOCK_FILE)

    def acquire_for_us(self) -> None:
        self.acquire(f"{os.getpid()}\n")

    def retake(self) -> None:
        """Take the lock of a re-created runtime dir (the old file is gone with the old dir)."""
        self.release()
        self.acquire_for_us()


class StateLock(FileLock):
    """The journal's owner. Held from before the journal is opened until the daemon exits."""

    def __init__(self, state: Path) -> None:
        super().__init__(state / STATE_LOCK_FILE)

    def acquire_for(self, runtime: Path, instance: str) -> None:
        info: dict[str, Any] = {"pid": os.getpid(), "runtime_dir": str(runtime), "instance": instance,
                                "started": time.time()}
        self.acquire(json.dumps(info))

    def retake_for(self, runtime: Path, instance: str) -> None:
        """Lock a re-created ``daemon.json`` (someone removed ours), or raise AlreadyRunning if
        another daemon got it first."""
        self.release()
        self.acquire_for(runtime, instance)

    def refusal(self, pid: int | None, held: str) -> str:
        runtime = parse_owner(held).get("runtime_dir") or "unknown"
        who = f"pid {pid}" if pid else "another process"
        return (f"effectd is already running on state dir {self.path.parent} ({who}, runtime dir {runtime}); "
                f"one journal has one daemon: use that daemon (EFFECTD_RUNTIME_DIR={runtime}) "
                f"or another state dir")
