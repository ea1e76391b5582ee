"""Supervision with real faults: workers killed, python effects that exit the interpreter or block
forever, leaks past the RSS limit, escaping grandchildren, resource limits."""

from __future__ import annotations

import os
import signal
import stat
from typing import Any

import psutil
import pytest

from effectd.client import EffectState
from effectd.daemon.proctree import ProcessIdentity, is_alive
from tests.conftest import wait_until


def _ready_worker_pids(c: Any) -> set[int]:
    return {w["pid"] for w in c.hello()["workers"] if w["state"] == "ready"}


@pytest.mark.slow
def test_worker_kill9_mid_effect_is_worker_lost_and_pool_restored(daemon: Any) -> None:
    c = daemon.client()
    eid = c.submit_shell("echo $$; sleep 100")
    wait_until(lambda: c.read_output(eid, "stdout", 0, 64).data.strip(), what="effect pid")
    child_pid = int(c.read_output(eid, "stdout", 0, 64).data)
    child = ProcessIdentity(child_pid, psutil.Process(child_pid).create_time())
    worker_pid = c.status(eid).spec and next(w["pid"] for w in c.hello()["workers"] if w["effects"])
    os.kill(worker_pid, signal.SIGKILL)
    rec = c.wait(eid, timeout=30)
    assert (rec.state, rec.reason) == (EffectState.FAILED, "worker_lost")
    wait_until(lambda: not is_alive(child), what="effect's process gone")
    wait_until(lambda: _ready_worker_pids(c) - {worker_pid}, what="pool restored")
    assert c.wait(c.submit_shell("true")).state is EffectState.SUCCEEDED


@pytest.mark.slow
def test_worker_lost_effect_is_retried_when_allowed(daemon: Any) -> None:
    c = daemon.client()
    eid = c.submit_shell("echo go; sleep 100", retries=1, retry_backoff=0.01)
    wait_until(lambda: c.read_output(eid, "stdout", 0, 8).size, what="started")
    worker_pid = next(w["pid"] for w in c.hello()["workers"] if w["effects"])
    os.kill(worker_pid, signal.SIGKILL)
    rec = wait_until(lambda: (r := c.status(eid)).attempt == 2 and r.state is EffectState.RUNNING and r,
                     what="second attempt")
    assert rec.attempts[0]["state"] == "failed" and rec.attempts[0]["reason"] == "worker_lost"
    c.cancel(eid)
    assert c.wait(eid, timeout=20).state is EffectState.CANCELLED


@pytest.mark.slow
def test_python_os_exit_is_worker_lost_and_next_python_effect_runs(daemon: Any) -> None:
    c = daemon.client()
    rec = c.wait(c.submit_python("effectd_test_effects:exit_hard", [1]), timeout=30)
    assert (rec.state, rec.reason) == (EffectState.FAILED, "worker_lost")
    assert c.wait(c.submit_python("effectd_test_effects:add", [1, 2]), timeout=30).result == 3


@pytest.mark.slow
def test_blocking_python_effect_is_not_a_hang_and_cancel_replaces_worker(daemon_factory: Any) -> None:
    d = daemon_factory("--heartbeat", "0.2")
    c = d.client()
    eid = c.submit_python("effectd_test_effects:block_forever")
    wait_until(lambda: c.status(eid).state is EffectState.RUNNING, what="running")
    busy = next(w for w in c.hello()["workers"] if w["effects"])
    # Far more than the liveness window (3 heartbeats): the worker's loop still answers.
    assert c.wait(eid, timeout=2.0).state is EffectState.RUNNING
    assert busy["pid"] in _ready_worker_pids(c)
    c.cancel(eid)
    assert c.wait(eid, timeout=20).state is EffectState.CANCELLED
    wait_until(lambda: not psutil.pid_exists(busy["pid"]) or
               psutil.Process(busy["pid"]).status() == psutil.STATUS_ZOMBIE, what="poisoned worker exits")
    assert c.wait(c.submit_python("effectd_test_effects:add", [2, 2]), timeout=30).result == 4


@pytest.mark.slow
def test_python_timeout_replaces_worker(daemon: Any) -> None:
    c = daemon.client()
    rec = c.wait(c.submit_python("effectd_test_effects:block_forever", timeout=0.5), timeout=30)
    assert (rec.state, rec.reason) == (EffectState.TIMED_OUT, "timeout")
    assert c.wait(c.submit_python("effectd_test_effects:add", [3, 3]), timeout=30).result == 6


@pytest.mark.slow
def test_worker_leaking_past_max_rss_is_recycled(daemon_factory: Any) -> None:
    d = daemon_factory("--max-worker-rss", str(120 * 1024 * 1024))
    c = d.client()
    first = c.submit_python("effectd_test_effects:leak_memory", [200])
    assert c.wait(first, timeout=30).state is EffectState.SUCCEEDED
    leaky = c.status(first).spec and next(iter(_ready_worker_pids(c) or {0}))
    wait_until(lambda: leaky not in _ready_worker_pids(c), what="leaky worker recycled")
    assert c.wait(c.submit_python("effectd_test_effects:add", [1, 1]), timeout=30).result == 2


@pytest.mark.slow
def test_cancel_kills_setsid_and_double_forked_descendants(daemon: Any) -> None:
    c = daemon.client()
    script = ("setsid sh -c 'echo $$; exec sleep 300' & "
              "(sh -c 'echo $$; exec sleep 300' &) ; "
              "echo $$; sleep 300")
    eid = c.submit_shell(script)
    wait_until(lambda: c.read_output(eid, "stdout", 0, 4096).data.count(b"\n") >= 3, what="three pids")
    pids = [int(x) for x in c.read_output(eid, "stdout", 0, 4096).data.split()]
    idents = [ProcessIdentity(p, psutil.Process(p).create_time()) for p in pids]
    c.cancel(eid)
    rec = c.wait(eid, timeout=30)
    assert rec.state is EffectState.CANCELLED
    # The final state is reached only after the whole tree is gone.
    assert not [i for i in idents if is_alive(i)]


@pytest.mark.slow
def test_sigterm_ignoring_effect_is_killed_after_grace(daemon: Any) -> None:
    c = daemon.client()
    eid = c.submit_shell("trap '' TERM; echo $$; while :; do sleep 0.1; done")
    wait_until(lambda: c.read_output(eid, "stdout", 0, 64).data.strip(), what="pid")
    pid = int(c.read_output(eid, "stdout", 0, 64).data)
    ident = ProcessIdentity(pid, psutil.Process(pid).create_time())
    c.cancel(eid)
    assert c.wait(eid, timeout=30).state is EffectState.CANCELLED
    assert not is_alive(ident)


@pytest.mark.slow
def test_cpu_rlimit_gives_clear_reason(client: Any) -> None:
    rec = client.wait(client.submit_shell("while :; do :; done", rlimits={"cpu": 1}), timeout=30)
    assert rec.state is EffectState.FAILED
    assert rec.signal == signal.SIGXCPU and "cpu time limit" in (rec.reason or "")
    rec = client.wait(client.submit_shell("ulimit -n", rlimits={"nofile": 64}), timeout=30)
    assert client.output(rec.id).strip() == b"64"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_crash_loop_is_reported_and_daemon_keeps_serving(daemon: Any) -> None:
    c = daemon.client()
    for _ in range(5):
        rec = c.wait(c.submit_python("effectd_test_effects:exit_hard", [3]), timeout=30)
        assert rec.reason == "worker_lost"
    info = c.hello()
    assert info["worker_crashes_recent"] >= 5
    assert c.wait(c.submit_python("effectd_test_effects:add", [5, 5]), timeout=60).result == 10


@pytest.mark.slow
def test_files_and_sockets_are_private(daemon: Any) -> None:
    c = daemon.client()
    c.wait(c.submit_shell("echo secret"))
    assert stat.S_IMODE(daemon.runtime.stat().st_mode) == 0o700
    for sock in daemon.runtime.glob("*.sock"):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600, sock
    assert stat.S_IMODE((daemon.state / "journal.sqlite3").stat().st_mode) == 0o600
    for f in (daemon.state / "outputs").rglob("*"):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o077 == 0, (f, oct(mode))


def test_world_writable_runtime_dir_is_refused(daemon_factory: Any) -> None:
    d = daemon_factory(start=False)
    d.runtime.mkdir(parents=True)
    d.runtime.chmod(0o777)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) == 1
    assert "writable by group or others" in d.log()


@pytest.mark.slow
def test_pool_grows_for_python_effects_and_idle_workers_retire(daemon_factory: Any) -> None:
    d = daemon_factory("--min-workers", "1", "--max-workers", "3", "--worker-idle-timeout", "0.5")
    c = d.client()
    ids = [c.submit_python("effectd_test_effects:count", [3, 0.3]) for _ in range(3)]
    records = c.wait_many(ids, timeout=40)
    assert all(r.state is EffectState.SUCCEEDED for r in records)
    # Three python effects overlapped: each had a worker to itself.
    assert max(r.started_at for r in records) < min(r.finished_at for r in records)
    wait_until(lambda: len(c.hello()["workers"]) == 1, timeout=20, what="idle workers retired to --min-workers")


@pytest.mark.slow
def test_worker_recycled_after_max_effects(daemon_factory: Any) -> None:
    d = daemon_factory("--max-effects-per-worker", "2", "--max-workers", "1")
    c = d.client()
    pids = set()
    for _ in range(4):
        rec = c.wait(c.submit_python("os:getpid"), timeout=30)
        pids.add(rec.result)
    assert len(pids) >= 2  # a fresh worker took over after two effects


def test_corrupt_journal_stops_the_daemon_with_a_clear_message(daemon_factory: Any) -> None:
    d = daemon_factory(start=False)
    d.state.mkdir(mode=0o700, parents=True)
    (d.state / "journal.sqlite3").write_bytes(b"this is not a sqlite database" * 200)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) == 1
    log = d.log()
    assert "cannot be used" in log and "Move it aside" in log
    assert (d.state / "journal.sqlite3").read_bytes().startswith(b"this is not")  # never reset
