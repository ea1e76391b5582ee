"""Streaming parallelism: exact live streams, late joins, forced drops, bounded memory,
completion order, dependencies, pipelines, groups and priorities."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
import pytest

from effectd.client import EffectState
from effectd.ipc.errors import NotFound
from tests.client_followers import record_followers
from tests.conftest import wait_until

SEQ_200K = b"".join(b"%d\n" % i for i in range(1, 200_001))


@pytest.mark.slow
def test_late_join_gets_every_line_once_and_followers_agree(client: Any) -> None:
    eid = client.submit_shell("seq 1 100000; sleep 0.3; seq 100001 200000")
    # Join after most of the output was written.
    wait_until(lambda: client.read_output(eid, "stdout", 0, 1).size > 500_000, what="most output")
    results: dict[str, bytes] = {}

    def follow(name: str) -> None:
        from effectd.client import Client

        with Client(client.runtime, state=client.state, autostart=False) as c:
            results[name] = b"".join(ch.data for ch in c.stream(eid, streams=("stdout",)))

    threads = [threading.Thread(target=follow, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results["a"] == results["b"] == SEQ_200K


@pytest.mark.slow
def test_forced_drops_are_filled_exactly(daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny high-water mark everywhere on the stream path, and a consumer slower than the
    # producer: PUB must drop, and the follower must fill every gap from the store.
    d = daemon_factory(env={"EFFECTD_STREAM_HWM": "2"})
    import os

    os.environ["EFFECTD_STREAM_HWM"] = "2"
    followers = record_followers(monkeypatch)
    try:
        c = d.client()
        # 100 blocks of 64 KiB in ~1 s: far more than the kernel's socket buffers absorb.
        producer = ("import sys, time\n"
                    "for i in range(100):\n"
                    "    sys.stdout.buffer.write(bytes([65 + i % 26]) * 65535 + b'\\n'); sys.stdout.flush()\n"
                    "    time.sleep(0.01)\n")
        eid = c.submit_shell(["python3", "-c", producer], max_output_bytes=64 * 1024 * 1024)
        wait_until(lambda: c.read_output(eid, "stdout", 0, 1).size > 0, what="producer started")
        data = bytearray()
        for chunk in c.stream(eid, streams=("stdout",)):
            data += chunk.data
            # Be a consumer slower than the producer (load shaping, not synchronisation), so
            # the tiny queues overflow and PUB drops.
            time.sleep(0.05)
        follower = followers[-1]
    finally:
        del os.environ["EFFECTD_STREAM_HWM"]
    expected = b"".join(bytes([65 + i % 26]) * 65535 + b"\n" for i in range(100))
    assert bytes(data) == expected
    assert follower.gaps_filled + follower.duplicates > 0, "no drop happened: the test proved nothing"


@pytest.mark.slow
def test_fast_producer_with_stopped_subscriber_keeps_memory_bounded(daemon: Any) -> None:
    import zmq

    c = daemon.client()
    size = 512 * 1024 * 1024
    eid = c.submit_shell(f"head -c {size} /dev/zero", max_output_bytes=size * 2)
    # A subscriber that subscribes and then never reads.
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 16)
    sub.connect(c.endpoints.stream)
    sub.setsockopt(zmq.SUBSCRIBE, eid.encode())
    try:
        daemon_proc = psutil.Process(daemon.pid)
        peak = {"daemon": 0, "workers": 0}
        while not c.status(eid).final:
            peak["daemon"] = max(peak["daemon"], daemon_proc.memory_info().rss)
            peak["workers"] = max([peak["workers"]] + [p.memory_info().rss for p in daemon.worker_processes()])
            time.sleep(0.05)  # sampling interval of the measurement
        rec = c.wait(eid)
        assert rec.state is EffectState.SUCCEEDED
        assert c.read_output(eid, "stdout", 0, 1).size == size
        # Documented bound: stream links hold at most EFFECTD_STREAM_HWM (256) chunks of 64 KiB.
        assert peak["daemon"] < 150 * 1024 * 1024, peak
        assert peak["workers"] < 150 * 1024 * 1024, peak
    finally:
        sub.close(linger=0)
        ctx.term()


@pytest.mark.slow
def test_output_cap_keeps_head_and_tail_with_marker(client: Any) -> None:
    eid = client.submit_shell("seq 1 100000", max_output_bytes=8192)
    rec = client.wait(eid)
    out = client.output(eid)
    full = b"".join(b"%d\n" % i for i in range(1, 100_001))
    assert out.startswith(full[:6144])
    assert out.endswith(full[-2048:])
    assert b"bytes of output truncated here]" in out
    assert rec.truncated["stdout"] == len(full) - 8192


@pytest.mark.slow
def test_generator_values_and_progress(client: Any) -> None:
    gid = client.submit_python("effectd_test_effects:count", [500])
    assert list(client.values(gid)) == list(range(500))
    pid = client.submit_python("effectd_test_effects:with_progress", [4])
    client.wait(pid)
    assert client.status(pid).progress["fraction"] == 1.0
    sid = client.submit_shell('echo "0.25 quarter" >&3; echo "- no fraction" >&3; echo done')
    client.wait(sid)
    assert client.status(sid).progress["message"] == "no fraction"


@pytest.mark.slow
def test_as_completed_yields_in_finish_order_while_others_run(client: Any) -> None:
    ids = [client.submit_shell(f"sleep {s}") for s in (1.5, 0.8, 0.1)]
    seen = []
    for rec in client.as_completed(ids, timeout=30):
        if not seen:
            # The first result is observed while the others still run.
            others = client.status_many([i for i in ids if i != rec.id])
            assert all(o.state is EffectState.RUNNING for o in others)
        seen.append(rec.id)
    assert seen == list(reversed(ids))
    first = client.wait_many(ids, return_when="first")
    assert all(r.final for r in first)


@pytest.mark.slow
def test_dependencies_run_after_success_and_cancel_on_failure(client: Any) -> None:
    ok = client.submit_shell("sleep 0.3; echo a")
    bad = client.submit_shell("exit 1")
    after_ok = client.submit_shell("echo b", after=[ok])
    after_bad = client.submit_shell("echo never", after=[bad])
    anyway = client.submit_shell("echo anyway", after=[bad], after_any_outcome=True)
    chained = client.submit_shell("echo chained", after=[after_bad])
    r_ok, r_after, r_bad_dep, r_anyway, r_chain = client.wait_many([ok, after_ok, after_bad, anyway, chained],
                                                                    timeout=30)
    assert r_after.state is EffectState.SUCCEEDED and r_after.started_at >= r_ok.finished_at
    assert (r_bad_dep.state, r_bad_dep.reason) == (EffectState.CANCELLED, "dependency_failed")
    assert r_anyway.state is EffectState.SUCCEEDED
    assert (r_chain.state, r_chain.reason) == (EffectState.CANCELLED, "dependency_failed")
    with pytest.raises(NotFound):
        client.submit_shell("true", after=["01ARZ3NDEKTSV4RRFFQ69G5FAV"])


@pytest.mark.slow
def test_stdin_from_pipes_while_producer_runs(client: Any) -> None:
    producer = client.submit_shell("seq 1 50000; sleep 0.5; seq 50001 100000")
    consumer = client.submit_shell("wc -l", stdin_from=producer)
    r_cons = client.wait(consumer, timeout=30)
    r_prod = client.status(producer)
    assert client.output(consumer).strip() == b"100000"
    assert r_cons.started_at < r_prod.finished_at  # phase 2 began while phase 1 still ran


@pytest.mark.slow
def test_group_limit_holds_and_does_not_starve_others(daemon_factory: Any) -> None:
    d = daemon_factory("--parallel", "8")
    c = d.client()
    c.set_group_limit("g", 2)
    grouped = [c.submit_shell("sleep 0.3", group="g") for _ in range(6)]
    other = c.submit_shell("sleep 0.1", group="h")
    records = c.wait_many([*grouped, other], timeout=30)
    spans = [(r.started_at, r.finished_at) for r in records[:6]]
    for t, _ in spans:
        assert sum(1 for s, f in spans if s <= t < f) <= 2
    r_other = records[6]
    assert r_other.finished_at < max(f for _, f in spans)  # ran while the group was still busy
    assert {g["name"]: g["parallel"] for g in c.groups()}["g"] == 2
    # The limit is persisted in the journal: a restarted daemon still has it.
    d.stop()
    d.start()
    assert {g["name"]: g["parallel"] for g in d.client().groups()}["g"] == 2


@pytest.mark.slow
def test_priorities_order_the_queue(daemon_factory: Any) -> None:
    d = daemon_factory("--parallel", "1")
    c = d.client()
    blocker = c.submit_shell("sleep 0.5")
    low = c.submit_shell("true", priority=-5)
    mid1 = c.submit_shell("true")
    high = c.submit_shell("true", priority=10)
    mid2 = c.submit_shell("true")
    records = c.wait_many([blocker, low, mid1, high, mid2], timeout=30)
    order = [r.id for r in sorted(records, key=lambda r: r.started_at)]
    assert order == [blocker, high, mid1, mid2, low]
