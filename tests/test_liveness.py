"""Liveness under stalls: a stopped or busy daemon never blames its workers, a stopped worker is
still detected, and one big request never holds the loop (issue 14.1).

Every test uses a real daemon and real SIGSTOP/SIGCONT; the stop itself is the fault, and the
only fixed-length interval in a test is how long the fault lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest

from effectd.client import EffectState
from effectd.client.aio import AsyncClient
from effectd.ipc.errors import DaemonUnavailable
from tests.conftest import wait_until


def _worker_pids(c: Any) -> set[int]:
    return {w["pid"] for w in c.hello()["workers"] if w["state"] == "ready"}


def _start_mixed_effects(c: Any, seconds: float) -> list[str]:
    """A shell, a sleep and a python effect, each lasting ``seconds``, all running."""
    ids = [c.submit_shell(f"sleep {seconds}; echo done"),
           c.submit_sleep(seconds),
           c.submit_python("effectd_test_effects:nap", [seconds])]
    wait_until(lambda: all(r.state is EffectState.RUNNING for r in c.status_many(ids)), what="effects running")
    return ids


def _unanswered_while_stopped(d: Any, seconds: float) -> int:
    """Keep the daemon stopped for ``seconds`` while the sync and async clients ask it for hello:
    each call must end in a clean DaemonUnavailable. Returns how many calls were made."""
    calls = 0
    os.kill(d.pid, signal.SIGSTOP)
    try:
        until = time.monotonic() + seconds
        sync = d.client(timeout=0.4, retries=0)
        while time.monotonic() < until:
            with pytest.raises(DaemonUnavailable):
                sync.hello()
            calls += 1

            async def one() -> None:
                async with AsyncClient(d.runtime, state=d.state, autostart=False, timeout=0.4, retries=0) as ac:
                    with pytest.raises(DaemonUnavailable):
                        await ac.hello()

            asyncio.run(one())
            calls += 1
    finally:
        os.kill(d.pid, signal.SIGCONT)
    return calls


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_stopped_daemon_keeps_every_effect_and_worker(daemon_factory: Any) -> None:
    # Heartbeat 0.5 s: liveness is 1.5 s, so a 4 s stop is > 2.5 x liveness (like 10 s at the default).
    d = daemon_factory("--heartbeat", "0.5", "--kill-grace", "1", "--min-workers", "2")
    c = d.client(timeout=5)
    ids = _start_mixed_effects(c, 6)
    pids = _worker_pids(c)
    assert _unanswered_while_stopped(d, 4.0) >= 2
    recs = c.wait_many(ids, timeout=30)
    assert [(r.state, r.reason) for r in recs] == [(EffectState.SUCCEEDED, None)] * 3, recs
    assert pids <= _worker_pids(c), "a worker was replaced after the daemon's stop"
    assert "lost" not in d.log()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_big_submit_many_does_not_stall_the_loop(daemon_factory: Any) -> None:
    d = daemon_factory("--heartbeat", "0.5", "--kill-grace", "1", "--max-queued", "20000")
    c = d.client(timeout=60, retries=0)
    ids = _start_mixed_effects(c, 3)
    pids = _worker_pids(c)
    labels = {f"label{i:02d}": f"v{i}" for i in range(64)}
    specs = [{"kind": "sleep", "seconds": 60, "labels": labels, "name": f"n{i}"} for i in range(10_000)]
    result: dict[str, Any] = {}

    def submit() -> None:
        try:
            result["ids"] = c.submit_many(specs, request_key="big-batch")
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    other = d.client(timeout=30, retries=0)
    thread = threading.Thread(target=submit)
    thread.start()
    worst = 0.0
    calls = 0
    while thread.is_alive():
        t0 = time.monotonic()
        other.hello()
        worst = max(worst, time.monotonic() - t0)
        calls += 1
    thread.join()
    assert "error" not in result, result
    assert len(result["ids"]) == 10_000 and len(set(result["ids"])) == 10_000
    loop = other.hello()["loop"]
    print(f"hello answered {calls} times during the batch; worst {worst:.3f}s; daemon's worst turn "
          f"{loop['worst_turn']:.3f}s")
    print("\n".join(line for line in d.log().splitlines() if "loop turn" in line))
    assert worst < 1.0, f"another client waited {worst:.2f}s for hello during the batch"
    # Idempotent: the same key returns the same ids, not a second batch.
    assert c.submit_many(specs[:1], request_key="big-batch") == result["ids"]
    recs = c.wait_many(ids, timeout=30)
    assert [(r.state, r.reason) for r in recs] == [(EffectState.SUCCEEDED, None)] * 3, recs
    assert pids <= _worker_pids(c)
    assert "lost" not in d.log()


@pytest.mark.timeout(60)
def test_briefly_stopped_worker_loses_nothing(daemon_factory: Any) -> None:
    d = daemon_factory("--heartbeat", "1", "--kill-grace", "1")
    c = d.client()
    eid = c.submit_shell("sleep 4; echo done")
    wait_until(lambda: c.status(eid).state is EffectState.RUNNING, what="running")
    pids = _worker_pids(c)
    (pid,) = pids
    os.kill(pid, signal.SIGSTOP)
    try:
        # Well inside the daemon's 3 s liveness even counting the worker's last heartbeat interval.
        time.sleep(1.2)  # the length of the fault, not a synchronisation
    finally:
        os.kill(pid, signal.SIGCONT)
    rec = c.wait(eid, timeout=30)
    assert (rec.state, rec.reason) == (EffectState.SUCCEEDED, None)
    assert _worker_pids(c) == pids
    assert "lost" not in d.log() and "daemon silent" not in d.log()


@pytest.mark.timeout(60)
def test_worker_stopped_beyond_liveness_is_lost(daemon_factory: Any) -> None:
    d = daemon_factory("--heartbeat", "0.3", "--kill-grace", "1")
    c = d.client()
    eid = c.submit_shell("sleep 60")
    wait_until(lambda: c.status(eid).state is EffectState.RUNNING, what="running")
    (pid,) = _worker_pids(c)
    os.kill(pid, signal.SIGSTOP)
    try:
        rec = c.wait(eid, timeout=20)
    finally:
        # SIGKILL ends a stopped process too; this only matters if the daemon failed to.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert (rec.state, rec.reason) == (EffectState.FAILED, "worker_lost")
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               what="stopped worker killed")
