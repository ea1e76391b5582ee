"""Many readers of one big effect: the daemon's memory is bounded by its read budget, not by the
number of readers, and every reader still gets every byte (docs/architecture.md "Many followers").

``read_output`` replies not yet read by their clients are limited to 64 MiB in total
(``effectd/daemon/flow.py``); past that, reads are answered ``busy`` (protocol.md §5.9) and the
reference clients retry transparently.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import zmq

from effectd.ipc import codec
from effectd.ipc.endpoints import Endpoints
from tests.conftest import DaemonHandle

MIB = 1024 * 1024
PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
RSS_GROWTH_BOUND = 160 * MIB
"""Documented bound: the daemon grows by at most the 64 MiB read budget, the encoding copies of the
replies in one loop turn and allocator slack; without flow control 50 readers of 8 MiB grow it by
~400-800 MiB."""


def expected_bytes(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def big_effect(client: Any, size: int) -> str:
    eid: str = client.submit_shell(f"yes {PATTERN.decode().strip()} | head -c {size}")
    assert client.wait(eid, timeout=60).state.value == "succeeded"
    return eid


class PeakRss:
    """Samples a process's RSS every 10 ms in a thread (psutil), keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return int(self.peak - self.start)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_crowd_of_8_mib_readers_is_bounded_by_the_read_budget(daemon: DaemonHandle,
                                                                ctx: zmq.Context[Any]) -> None:
    """50 readers each ask for 8 MiB at the same moment, round after round, until they have the
    whole 20 MB stream; all requests of a round reach the daemon before any reply is read."""
    size, readers = 20 * 1000 * 1000, 50
    eid = big_effect(daemon.client(), size)
    endpoint = Endpoints.for_runtime(daemon.runtime).control
    socks = []
    for _ in range(readers):
        sock: zmq.Socket[bytes] = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        socks.append(sock)
    got = [bytearray() for _ in range(readers)]
    busy = 0
    with PeakRss(daemon.pid) as rss:
        deadline = time.monotonic() + 90
        while any(len(g) < size for g in got) and time.monotonic() < deadline:
            active = [i for i in range(readers) if len(got[i]) < size]
            for i in active:
                socks[i].send(codec.pack({"v": 1, "rid": i, "op": "read_output", "id": eid, "stream": "stdout",
                                          "offset": len(got[i]), "max_bytes": 8 * MIB}))
            for i in active:
                assert socks[i].poll(20_000), "no reply"
                body = socks[i].recv()
                reply = codec.unpack(body, max_bytes=len(body))
                if reply["ok"]:
                    assert reply["offset"] == len(got[i]) and reply["size"] == size
                    got[i] += reply["data"]
                else:
                    assert reply["error"]["code"] == "busy", reply
                    busy += 1
    exact = sum(1 for g in got if bytes(g) == expected_bytes(size))
    print(f"{readers} readers x {size / 1e6:.0f} MB: {exact} exact, {busy} busy answers, "
          f"daemon RSS {rss.start / MIB:.0f} -> peak {rss.peak / MIB:.0f} MiB")
    assert exact == readers
    assert rss.growth < RSS_GROWTH_BOUND, f"daemon RSS grew by {rss.growth / MIB:.0f} MiB"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stream_followers_are_exact_when_reads_are_answered_busy(daemon_factory: Any) -> None:
    """50 Client.stream followers (threads) of a 20 MB effect while it runs, with a read budget
    so small that most reads are first answered busy: every follower still gets every byte."""
    size, followers = 20 * 1000 * 1000, 50
    d = daemon_factory("--kill-grace", "1", env={"EFFECTD_READ_INFLIGHT": str(2 * MIB)})
    main = d.client(timeout=30)
    # Paced so that followers join while it runs: live chunks, gaps and replays all happen.
    eid = main.submit_shell(f"for i in 1 2 3 4; do yes {PATTERN.decode().strip()} | head -c {size // 4}; "
                            f"sleep 0.2; done")
    digests: dict[int, str] = {}
    errors: list[str] = []
    expected = hashlib.sha256(expected_bytes(size // 4) * 4).hexdigest()

    def follow(i: int) -> None:
        try:
            h = hashlib.sha256()
            for chunk in d.client(timeout=30).stream(eid, streams=("stdout",)):
                h.update(chunk.data)
            digests[i] = h.hexdigest()
        except Exception as exc:  # reported below, with the others
            errors.append(f"follower {i}: {exc!r}")

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(followers)]
    with PeakRss(d.pid) as rss:
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
    hello = main.hello()
    exact = sum(1 for v in digests.values() if v == expected)
    print(f"{followers} followers: {exact} exact, {hello['read_busy']} busy answers, "
          f"daemon RSS peak {rss.peak / MIB:.0f} MiB")
    assert not errors, errors[:3]
    assert exact == followers
    assert hello["read_busy"] > 0, "the budget was never exhausted: the test did not test busy"
    assert rss.growth < RSS_GROWTH_BOUND


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_async_followers_are_exact_when_reads_are_answered_busy(daemon_factory: Any) -> None:
    """20 AsyncClient.stream followers (one client each, one event loop) under a tiny read budget:
    busy answers are retried transparently and every follower gets every byte."""
    import asyncio

    from effectd.client.aio import AsyncClient

    size, followers = 4 * 1000 * 1000, 20
    d = daemon_factory("--kill-grace", "1", env={"EFFECTD_READ_INFLIGHT": str(256 * 1024)})
    expected = hashlib.sha256(expected_bytes(size)).hexdigest()

    def client() -> AsyncClient:
        return AsyncClient(d.runtime, state=d.state, autostart=False, timeout=30)

    async def follow(eid: str) -> str:
        h = hashlib.sha256()
        async with client() as c:
            async for chunk in c.stream(eid, streams=("stdout",)):
                h.update(chunk.data)
        return h.hexdigest()

    async def run() -> tuple[list[str], int]:
        async with client() as c:
            eid = await c.submit_shell(f"yes {PATTERN.decode().strip()} | head -c {size}")
            digests = await asyncio.gather(*(follow(eid) for _ in range(followers)))
            return list(digests), (await c.hello())["read_busy"]

    digests, busy = asyncio.run(run())
    assert sum(1 for v in digests if v == expected) == followers
    assert busy > 0, "no read was answered busy: the test did not test busy"
