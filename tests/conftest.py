"""Shared fixtures: real effectd daemons, each in its own short temporary directories.

Every test daemon comes from one factory (:class:`DaemonFactory`), in one of three scopes:
``daemon``/``client``/``daemon_factory`` per test, ``module_daemon_factory``/``shared_daemon``
per module (for files whose tests only need *a* daemon: one start instead of dozens). A handle
may be started by the test instead of the factory (``start=False``, or a client's autostart on
its dirs).

Teardown stops every daemon on the handles' dirs (whoever started it) and proves that nothing
it started survives: no daemon, no worker process (found by its ``--runtime-dir`` argument) and
no effect process (found by the ``EFFECTD_EFFECT_ID`` marker every effect's processes inherit).

Timeouts: pyproject's 60 s default; add ``@pytest.mark.timeout(N)`` only when the test's own
bounded waits add up to more. Mark ``@pytest.mark.slow`` any test taking more than about a second
(``--durations=0``), so that ``-m "not slow"`` stays a loop of under a minute.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.babysitter.fixtures import babysitter_cli, babysitter_sdk, make_run  # noqa: F401

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
MARKER = "EFFECTD_EFFECT_ID"


def _short_tmp() -> Path:
    # ipc socket paths are limited to 107 bytes: pytest's tmp_path is often too long.
    path = Path(tempfile.mkdtemp(prefix="ed-", dir="/tmp"))
    path.chmod(0o700)
    return path


def daemons_using(option: str, env_var: str, directory: Path) -> list[psutil.Process]:
    """Live effectd daemons whose ``option`` (e.g. ``--runtime-dir``), or else ``env_var`` in
    their environment, names ``directory``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = p.info.get("cmdline") or []
            if "effectd.daemon.main" not in cmd or p.status() == psutil.STATUS_ZOMBIE:
                continue
            used = cmd[cmd.index(option) + 1] if option in cmd else p.environ().get(env_var, "")
            if used == str(directory):
                found.append(p)
    return found


@dataclass
class DaemonHandle:
    root: Path
    runtime: Path
    state: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    clients: list[Any] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def start(self, wait: bool = True) -> DaemonHandle:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "effectd.daemon.main", *self.args],
                                         env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        from effectd.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.runtime, state=self.state, autostart=False, timeout=0.5, retries=0) as c:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
                with contextlib.suppress(Exception):
                    info = c.hello()
                    if any(w["state"] == "ready" for w in info["workers"]) or "--min-workers" in self.args:
                        return
                time.sleep(0.02)  # bounded startup poll, not effect synchronisation
        raise AssertionError(f"daemon did not become ready:\n{self.log()}")

    def client(self, **kwargs: Any) -> Any:
        from effectd.client import Client

        kwargs.setdefault("autostart", False)
        c = Client(self.runtime, state=self.state, **kwargs)
        self.clients.append(c)
        return c

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        from effectd.client import Client

        try:  # stop at once (no drain); running effects end 'lost' with reason daemon_stopped
            with Client(self.runtime, state=self.state, autostart=False, timeout=2.0, retries=0) as c:
                c.shutdown(drain=False)
        except Exception:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.log()}") from None

    def daemon_processes(self) -> list[psutil.Process]:
        """Live effectd daemons whose runtime dir is this handle's (by argument or environment),
        whoever started them: the fixture, the test, or a client's autostart."""
        return daemons_using("--runtime-dir", "EFFECTD_RUNTIME_DIR", self.runtime)

    def worker_processes(self) -> list[psutil.Process]:
        out = []
        needle = str(self.runtime)
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if "effectd.daemon.worker" in cmd and needle in cmd:
                out.append(p)
        return out

    def effect_ids(self) -> set[str]:
        db = self.state / "journal.sqlite3"
        if not db.exists():
            return set()
        con = sqlite3.connect(db)
        try:
            return {r[0] for r in con.execute("SELECT id FROM effects")}
        except sqlite3.Error:
            return set()
        finally:
            con.close()

    def effect_processes(self, ids: set[str] | None = None) -> list[psutil.Process]:
        ids = self.effect_ids() if ids is None else ids
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.environ().get(MARKER) in ids:
                    out.append(p)
        return out

    def survivors(self, grace: float = 10.0) -> list[psutil.Process]:
        """Processes of this daemon still alive after ``grace`` seconds (waiting on their exit)."""
        procs = self.worker_processes() + self.effect_processes()
        _, alive = psutil.wait_procs(procs, timeout=grace)
        return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def make_daemon(args: list[str] | None = None, env: dict[str, str] | None = None) -> DaemonHandle:
    root = _short_tmp()
    runtime, state = root / "run", root / "state"
    full_env = dict(os.environ)
    full_env.update({"EFFECTD_RUNTIME_DIR": str(runtime), "EFFECTD_STATE_DIR": str(state),
                     "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)]),
                     "EFFECTD_LOG_LEVEL": "DEBUG"})
    full_env.update(env or {})
    return DaemonHandle(root, runtime, state, list(args or []), full_env)


def _stop_other_daemons(d: DaemonHandle) -> list[str]:
    """Stop daemons on ``d``'s runtime dir that ``d.proc`` is not (autostarted by a client);
    describe those that outlive a SIGTERM pair and 30 s."""
    ours = d.proc.pid if d.proc is not None else None
    procs = [p for p in d.daemon_processes() if p.pid != ours]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGTERM)  # the second one: stop at once, no drain
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return [f"daemon pid {p.pid}" for p in alive]


def cleanup_daemon(d: DaemonHandle) -> list[str]:
    """Stop the daemon (and any other one on its runtime dir) and everything they started;
    return descriptions of leaked processes."""
    for c in d.clients:
        with contextlib.suppress(Exception):
            c.close()
    with contextlib.suppress(Exception):
        d.stop()
    leaks = _stop_other_daemons(d)
    for p in d.survivors():
        with contextlib.suppress(psutil.Error):
            leaks.append(f"pid {p.pid}: {' '.join(p.cmdline())}")
            p.kill()
    shutil.rmtree(d.root, ignore_errors=True)
    return leaks


class DaemonFactory:
    """Start daemons with custom arguments: ``d = factory("--parallel", "2")``; ``close()`` stops
    them all and fails if any process one of them started survives."""

    def __init__(self) -> None:
        self.handles: list[DaemonHandle] = []

    def __call__(self, *args: str, env: dict[str, str] | None = None, start: bool = True) -> DaemonHandle:
        d = make_daemon(list(args), env)
        self.handles.append(d)
        return d.start() if start else d

    def close(self) -> None:
        leaks: list[str] = []
        for d in self.handles:
            leaks += cleanup_daemon(d)
        self.handles.clear()
        assert not leaks, f"processes survived the daemon: {leaks}"


@pytest.fixture
def daemon_factory() -> Iterator[DaemonFactory]:
    """Daemons for one test: ``d = daemon_factory("--parallel", "2")``."""
    factory = DaemonFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_daemon_factory() -> Iterator[DaemonFactory]:
    """Daemons shared by the tests of one module; stopped and checked after its last test."""
    factory = DaemonFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def shared_daemon(module_daemon_factory: DaemonFactory) -> DaemonHandle:
    """One daemon for a whole module, for tests that do not depend on a fresh journal."""
    return module_daemon_factory("--kill-grace", "1")


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> DaemonHandle:
    return daemon_factory("--kill-grace", "1")


@pytest.fixture
def client(daemon: DaemonHandle) -> Any:
    return daemon.client()


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll a cheap predicate with a bounded timeout (for external facts like a pid file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")
