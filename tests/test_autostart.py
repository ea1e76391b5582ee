"""Starting the daemon on demand, with no fixture daemon running: the client and effectctl start
one (exactly one, however many start it at once), a second daemon on a runtime dir is refused,
autostart=False never starts one, and unsafe runtime dirs are refused.

conftest's ``daemon_factory(start=False)`` gives each test its own dirs and environment; the daemon
is started by the code under test, so the factory's teardown finds it through its runtime dir
(argument or environment), stops it, and proves that no daemon, worker or effect process survives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from effectd.client import Client, DaemonUnavailable, EffectState
from effectd.client.autostart import running_pid
from tests.conftest import DaemonFactory, DaemonHandle, wait_until

EXIT_ALREADY_RUNNING = 75


@pytest.fixture
def cold(daemon_factory: DaemonFactory, monkeypatch: pytest.MonkeyPatch) -> DaemonHandle:
    """Dirs and environment for a daemon nobody started yet; this process's environment points
    at them, so ``Client()`` and effectctl find them the way a user's would."""
    d = daemon_factory(start=False)
    for key in ("EFFECTD_RUNTIME_DIR", "EFFECTD_STATE_DIR", "PYTHONPATH"):
        monkeypatch.setenv(key, d.env[key])
    return d


def client_code(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


# ---- autostart ------------------------------------------------------------------------------


@pytest.mark.slow
def test_client_autostarts_a_daemon(cold: DaemonHandle) -> None:
    assert running_pid(cold.runtime) is None and not cold.daemon_processes()
    with Client(autostart=True) as c:  # dirs from the environment
        info = c.hello()
        pid = info["pid"]
        assert info["managed_by"] == "autostart"
        assert info["runtime_dir"] == str(cold.runtime) and info["state_dir"] == str(cold.state)
        eid = c.submit_shell("echo from-autostarted")
        assert c.wait(eid, timeout=20).state is EffectState.SUCCEEDED
        assert c.output(eid) == b"from-autostarted\n"
    assert running_pid(cold.runtime) == pid
    assert [p.pid for p in cold.daemon_processes()] == [pid]
    assert os.getsid(pid) == pid  # detached: its own session, so no terminal signal reaches it
    log = cold.state / "effectd.log"  # an autostarted daemon logs to its state dir
    assert log.exists()
    assert f"started (pid {pid}" in log.read_text()
    assert (cold.runtime.stat().st_mode & 0o777) == 0o700
    with Client(autostart=True) as c2:  # a second client finds the running one
        assert c2.hello()["pid"] == pid


@pytest.mark.slow
def test_effectctl_run_works_cold(cold: DaemonHandle) -> None:
    p = subprocess.run([sys.executable, "-m", "effectd.cli", "run", "--", "true"], env=dict(cold.env),
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b""
    pid = running_pid(cold.runtime)
    assert pid is not None and [p.pid for p in cold.daemon_processes()] == [pid]
    p = subprocess.run([sys.executable, "-m", "effectd.cli", "run", "--", "sh", "-c", "echo warm"],
                       env=dict(cold.env), capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (p.returncode, p.stdout) == (0, b"warm\n")
    assert running_pid(cold.runtime) == pid  # reused, not restarted


# ---- one daemon per runtime dir -------------------------------------------------------------


@pytest.mark.slow
def test_second_daemon_on_the_same_runtime_dir_is_refused(daemon: DaemonHandle) -> None:
    for extra in ([], ["--runtime-dir", str(daemon.runtime), "--state-dir", str(daemon.state)]):
        p = subprocess.run([sys.executable, "-m", "effectd.daemon.main", *extra], env=dict(daemon.env),
                           capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert p.returncode == EXIT_ALREADY_RUNNING, p.stderr
        err = p.stderr.decode()
        assert "already running" in err and str(daemon.pid) in err, err
    assert daemon.client().hello()["pid"] == daemon.pid  # the first one is untouched
    assert [p.pid for p in daemon.daemon_processes()] == [daemon.pid]


RACER = """
    import os, sys, time
    from effectd.client import Client
    ready, go = sys.argv[1], sys.argv[2]
    open(ready, "w").close()
    while not os.path.exists(go):   # every racer is imported and waiting: start together
        time.sleep(0.001)
    with Client(autostart=True) as c:
        print(c.hello()["pid"])
"""


@pytest.mark.slow
def test_ten_concurrent_processes_start_exactly_one_daemon(cold: DaemonHandle, tmp_path: Path) -> None:
    go = tmp_path / "go"
    racers = [subprocess.Popen([*client_code(RACER), str(tmp_path / f"ready-{i}"), str(go)],
                               env=dict(cold.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL) for i in range(10)]
    try:
        wait_until(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(10)), timeout=30,
                   what="all ten racers to be ready")
        assert running_pid(cold.runtime) is None
        go.touch()
        results = [r.communicate(timeout=40) for r in racers]
    finally:
        for r in racers:
            if r.poll() is None:
                r.kill()
                r.wait()
    assert [r.returncode for r in racers] == [0] * 10, [e.decode()[-500:] for _, e in results]
    pids = {int(out) for out, _ in results}
    assert len(pids) == 1, pids  # all ten talked to the same daemon
    [pid] = pids
    assert running_pid(cold.runtime) == pid
    # Losing racers' daemons exit with EX_TEMPFAIL once they find the lock taken.
    wait_until(lambda: [p.pid for p in cold.daemon_processes()] == [pid], timeout=20,
               what="the losing daemons to exit")


@pytest.mark.slow
def test_ten_concurrent_threads_start_exactly_one_daemon(cold: DaemonHandle) -> None:
    barrier = threading.Barrier(10)
    results: list[Any] = [None] * 10

    def hello(i: int) -> None:
        try:
            with Client(autostart=True) as c:
                barrier.wait(timeout=20)
                results[i] = c.hello()["pid"]
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=hello, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1, results
    pid = results[0]
    wait_until(lambda: [p.pid for p in cold.daemon_processes()] == [pid], timeout=20,
               what="the losing daemons to exit")


# ---- autostart disabled ---------------------------------------------------------------------


def test_autostart_false_without_daemon_is_unavailable(cold: DaemonHandle) -> None:
    with Client(autostart=False) as c, pytest.raises(DaemonUnavailable) as exc:
        c.hello()
    assert "not running" in str(exc.value)
    # A stale lock file (a dead daemon's pid, no flock) and a stale socket change nothing.
    cold.runtime.mkdir(mode=0o700, parents=True)
    (cold.runtime / "effectd.lock").write_text("999999\n")
    (cold.runtime / "control.sock").touch()
    assert running_pid(cold.runtime) is None
    with Client(autostart=False) as c, pytest.raises(DaemonUnavailable):
        c.hello()
    p = subprocess.run([sys.executable, "-m", "effectd.cli", "daemon", "status"], env=dict(cold.env),
                       capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    assert p.returncode == 3 and b"not running" in p.stdout
    assert not cold.daemon_processes()  # nothing was started


# ---- unsafe runtime dirs --------------------------------------------------------------------


def start_daemon_foreground(d: DaemonHandle) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "effectd.daemon.main"], env=dict(d.env),
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


def test_world_writable_runtime_dir_is_refused(cold: DaemonHandle) -> None:
    cold.runtime.mkdir()
    cold.runtime.chmod(0o777)
    p = start_daemon_foreground(cold)
    assert p.returncode == 1, p.stderr
    err = p.stderr.decode()
    assert str(cold.runtime) in err and "writable by group or others" in err and "777" in err, err
    assert not (cold.runtime / "control.sock").exists()
    with Client(autostart=True) as c, pytest.raises(DaemonUnavailable) as exc:
        c.hello()  # the client refuses it too, before starting anything
    assert str(cold.runtime) in str(exc.value)
    assert not cold.daemon_processes()


def test_group_writable_state_dir_is_refused(cold: DaemonHandle) -> None:
    cold.state.mkdir()
    cold.state.chmod(0o770)
    p = start_daemon_foreground(cold)
    assert p.returncode == 1, p.stderr
    assert str(cold.state) in p.stderr.decode() and "writable" in p.stderr.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_runtime_dir_owned_by_another_user_is_refused(cold: DaemonHandle) -> None:
    cold.runtime.mkdir(mode=0o700)
    os.chown(cold.runtime, 65534, 65534)
    p = start_daemon_foreground(cold)
    assert p.returncode == 1, p.stderr
    err = p.stderr.decode()
    assert str(cold.runtime) in err and "owned by uid 65534" in err, err
    with Client(autostart=True) as c, pytest.raises(DaemonUnavailable) as exc:
        c.hello()
    assert "65534" in str(exc.value)
    assert not cold.daemon_processes()
