"""Durability with real crashes: kill -9 of the daemon (and of its workers), drain, disk failure.

No acknowledged effect is ever lost: every id that got an ``ok`` reply is in the journal after a
crash and reaches a final state. Workers outlive a crashed daemon and are re-adopted, so their
effects finish with exact output.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from typing import Any

import psutil
import pytest

from effectd.client import Client, EffectState
from effectd.ipc.errors import DaemonUnavailable, EffectdError
from tests.conftest import DaemonHandle, wait_until

COUNT_TO_50 = "for i in $(seq 1 50); do echo $i; sleep 0.1; done"
EXPECTED_50 = b"".join(b"%d\n" % i for i in range(1, 51))


def _restart(d: DaemonHandle) -> None:
    d.kill9()
    d.start()


@pytest.mark.slow
def test_daemon_kill9_running_effects_are_readopted_with_exact_output(daemon_factory: Any) -> None:
    d = daemon_factory("--adopt-grace", "15")
    c = d.client()
    ids = [c.submit_shell(COUNT_TO_50) for _ in range(3)]
    # Wait until each has produced some output, so the crash lands mid-stream.
    wait_until(lambda: all(c.read_output(i, "stdout", 0, 1).size > 0 for i in ids), what="first output")
    old_workers = {p.pid for p in d.worker_processes()}
    _restart(d)
    c2 = d.client()
    records = list(c2.as_completed(ids, timeout=40))
    assert {r.id for r in records} == set(ids)
    for r in records:
        assert r.state is EffectState.SUCCEEDED, (r.state, r.reason, d.log())
        assert c2.output(r.id) == EXPECTED_50
        assert r.attempt == 1
    # They were re-adopted by the old workers, not re-run.
    assert old_workers & {p.pid for p in d.worker_processes()}


@pytest.mark.slow
def test_stream_stays_exact_across_a_daemon_crash(daemon_factory: Any) -> None:
    d = daemon_factory("--adopt-grace", "15")
    c = d.client()
    eid = c.submit_shell(COUNT_TO_50)
    wait_until(lambda: c.read_output(eid, "stdout", 0, 1).size > 0, what="first output")
    _restart(d)
    c2 = d.client()
    data = b"".join(ch.data for ch in c2.stream(eid, streams=("stdout",)))
    assert data == EXPECTED_50


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_kill9_of_daemon_and_workers_leaves_nothing_running(daemon_factory: Any, tmp_path: Any) -> None:
    d = daemon_factory("--adopt-grace", "1", "--kill-grace", "1")
    c = d.client()
    trees = [c.submit_shell("echo begun; sleep 100 & sleep 100 & wait") for _ in range(2)]
    retried = c.submit_shell("echo attempt; sleep 100", retries=1, retry_backoff=0.01)
    ids = [*trees, retried]
    wait_until(lambda: all(c.read_output(i, "stdout", 0, 1).size > 0 for i in ids), what="effects started")
    wait_until(lambda: len(d.effect_processes(set(ids))) >= 7, what="effect processes")
    victims = d.effect_processes(set(ids))
    for p in d.worker_processes():
        p.kill()
    d.kill9()
    d.start()
    c2 = d.client()
    for r in c2.wait_many(trees, timeout=30):
        assert r.state is EffectState.LOST, (r.state, r.reason)
        assert r.reason == "daemon_crashed"
        assert c2.output(r.id) == b"begun\n"  # output written before the crash stays readable
    # The retried one runs again (second attempt) and is still running: its first tree is gone.
    rec = wait_until(lambda: (r := c2.status(retried)).attempt == 2 and r, what="retry")
    assert rec.attempts and rec.attempts[0]["state"] == "lost"
    _, alive = psutil.wait_procs(victims, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    c2.cancel(retried)
    assert c2.wait(retried, timeout=20).state is EffectState.CANCELLED


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_acknowledged_submit_is_lost_across_random_kill9(daemon_factory: Any) -> None:
    """Several threads submit while the daemon is killed at random moments (seeded, repeatable);
    after each restart every acknowledged id is in the journal and every effect ends final."""
    rng = random.Random(20261123)
    d = daemon_factory("--adopt-grace", "2")
    acked: list[str] = []
    lock = threading.Lock()
    for _round in range(4):
        stop = threading.Event()

        def submitter(n: int, stop: threading.Event = stop, round_no: int = _round) -> None:
            with Client(d.runtime, state=d.state, autostart=False, timeout=0.5, retries=0) as c:
                while not stop.is_set():
                    try:
                        eid = c.submit_shell(["true"], name=f"r{round_no}-{n}")
                    except EffectdError:
                        continue  # not acknowledged: the daemon is down; nothing to account for
                    with lock:
                        acked.append(eid)

        threads = [threading.Thread(target=submitter, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        target = len(acked) + rng.randint(20, 120)
        wait_until(lambda target=target: len(acked) >= target, timeout=60, what="submits")
        d.kill9()
        stop.set()
        for t in threads:
            t.join(10)
        d.start()
    c = d.client()
    records = c.wait_many(acked, timeout=120)  # raises NotFound if any acknowledged id is missing
    assert len(records) == len(acked)
    assert all(r.final for r in records)
    assert all(r.state in (EffectState.SUCCEEDED, EffectState.LOST) for r in records)


@pytest.mark.slow
def test_sigterm_drain_finishes_short_and_interrupts_long(daemon_factory: Any) -> None:
    d = daemon_factory("--drain-timeout", "2", "--kill-grace", "1")
    c = d.client()
    short = c.submit_shell("sleep 0.5; echo short done")
    long = c.submit_shell("echo long begun; sleep 60")
    wait_until(lambda: c.read_output(long, "stdout", 0, 1).size > 0, what="long started")
    assert d.proc is not None
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    with pytest.raises(EffectdError):
        # Draining daemons refuse new work with a clear error (or are already gone).
        c.submit_shell("true")
    assert d.proc.wait(30) == 0
    assert time.monotonic() - started < 2 + 1 + 10
    assert not d.survivors(grace=5)
    d.start()
    c2 = d.client()
    r_short, r_long = c2.status_many([short, long])
    assert r_short.state is EffectState.SUCCEEDED
    assert (r_long.state, r_long.reason) == (EffectState.LOST, "daemon_stopped")


@pytest.mark.slow
def test_draining_daemon_refuses_submits_with_unavailable(daemon_factory: Any) -> None:
    d = daemon_factory("--drain-timeout", "5", "--kill-grace", "1")
    c = d.client()
    long = c.submit_shell("sleep 60")
    wait_until(lambda: c.status(long).state is EffectState.RUNNING, what="running")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    with pytest.raises(EffectdError) as exc:
        c.submit_shell("true")
    assert exc.value.code in ("unavailable",)
    assert "shutting down" in exc.value.message or isinstance(exc.value, DaemonUnavailable)


@pytest.mark.slow
def test_retention_bounds_state_dir(daemon_factory: Any) -> None:
    d = daemon_factory()
    c = d.client()
    ids = [c.submit_shell("head -c 10000 /dev/zero") for _ in range(10)]
    c.wait_many(ids, timeout=30)
    freed = c.gc(retain_count=3)
    assert freed["removed"] == 7 and freed["kept"] == 3
    assert freed["freed_bytes"] == 7 * 10000
    assert len(c.list(limit=100)) == 3
    outputs = [p for p in (d.state / "outputs").iterdir()]
    assert len(outputs) == 3
    freed = c.gc(retain_bytes=15000)
    assert freed["kept"] == 1


@pytest.mark.slow
def test_full_disk_refuses_submits_without_acknowledging(daemon_factory: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    d = daemon_factory(start=False)
    d.state.mkdir(mode=0o700, parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k,mode=0700", "tmpfs", str(d.state)], check=True)
    try:
        d.start()
        c = d.client()
        refused = None
        acked: list[str] = []
        big_env = {"PAD": "x" * 20000}
        for _ in range(200):
            try:
                acked.append(c.submit_shell("true", env=big_env))
            except EffectdError as exc:
                refused = exc
                break
        assert refused is not None and refused.code == "disk_full", refused
        assert c.hello()["pid"] == d.pid  # still alive and answering
        for eid in acked:  # everything acknowledged is really there
            assert c.status(eid).id == eid
    finally:
        with contextlib.suppress(Exception):
            d.stop()
        subprocess.run(["umount", "-l", str(d.state)], check=False)


@pytest.mark.slow
def test_worker_without_daemon_kills_its_effects_after_orphan_timeout(daemon_factory: Any) -> None:
    d = daemon_factory("--orphan-timeout", "2", "--kill-grace", "1", "--heartbeat", "0.3")
    c = d.client()
    eid = c.submit_shell("echo $$; sleep 300")
    wait_until(lambda: c.read_output(eid, "stdout", 0, 64).data.strip(), what="effect pid")
    pid = int(c.read_output(eid, "stdout", 0, 64).data)
    child = psutil.Process(pid)
    workers = d.worker_processes()
    d.kill9()  # and no daemon comes back
    # Nothing runs unsupervised forever: the worker notices the silence, waits out the orphan
    # timeout, kills its effect's tree and exits.
    _, alive = psutil.wait_procs([child, *workers], timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
