"""The asyncio client against a real daemon: concurrent waits on one client, completion order,
cancellation safety, exact streams, and Lazy Pirate recovery."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from effectd.client import EffectState
from effectd.client.aio import AsyncClient
from effectd.ipc.errors import DaemonUnavailable, InvalidState, NotFound
from tests.client_followers import record_followers
from tests.conftest import DaemonHandle

T = TypeVar("T")

SEQ_100K = b"".join(b"%d\n" % i for i in range(1, 100_001))


@pytest.fixture
def daemon(shared_daemon: DaemonHandle) -> Iterator[DaemonHandle]:
    """The module's shared daemon (these tests need only *a* daemon; the two that stop it start
    their own), plus: cancel what a test left running, so the next one starts from a quiet daemon
    (and workers and effects outlive a stopped daemon: the teardown would report them as leaks)."""
    daemon = shared_daemon
    yield daemon
    with contextlib.suppress(Exception):
        c = daemon.client(timeout=2, retries=0)
        ids = [r.id for r in c.list(states=["queued", "running"], limit=10_000)]
        if ids:
            c.cancel(*ids)
            c.wait_many(ids, timeout=20)


def run(daemon: Any, body: Callable[[AsyncClient], Awaitable[T]], **kwargs: Any) -> T:
    """Run ``body(client)`` in a fresh event loop with an AsyncClient of ``daemon``."""

    async def main() -> T:
        kwargs.setdefault("autostart", False)
        async with AsyncClient(daemon.runtime, state=daemon.state, **kwargs) as c:
            return await body(c)

    return asyncio.run(main())


def test_every_operation_round_trips(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        info = await c.hello()
        assert info["protocol"] == 1 and info["pid"] > 0
        sh = await c.submit_shell("echo out; echo err >&2; exit 3", name="sh", labels={"t": "aio"})
        py = await c.submit_python("effectd_test_effects:add", [2, 3])
        sl = await c.submit_sleep(0.05)
        r_sh, r_py, r_sl = await c.wait_many([sh, py, sl], timeout=20)
        assert (r_sh.state, r_sh.exit_code) == (EffectState.FAILED, 3)
        assert (r_py.state, r_py.result) == (EffectState.SUCCEEDED, 5)
        assert r_sl.state is EffectState.SUCCEEDED
        assert (await c.result(py)).result == 5
        assert await c.output(sh, "stdout") == b"out\n"
        assert await c.output(sh, "stderr") == b"err\n"
        piece = await c.read_output(sh, "stdout", 1, 2)
        assert (piece.data, piece.next_offset, piece.size, piece.eof) == (b"ut", 3, 4, False)
        assert [r.id for r in await c.list(labels={"t": "aio"})] == [sh]
        assert (await c.status(sh)).name == "sh"
        many = await c.submit_many([{"kind": "sleep", "seconds": 0.01}] * 3, request_key="k-many")
        assert await c.submit_many([{"kind": "sleep", "seconds": 0.01}] * 3, request_key="k-many") == many
        first = await c.wait_many([*many, await c.submit_sleep(30)], timeout=20, return_when="first")
        assert any(r.final for r in first)
        values = [v async for v in c.values(await c.submit_python("effectd_test_effects:count", [5]))]
        assert values == [0, 1, 2, 3, 4]
        long = await c.submit_sleep(30)
        with pytest.raises(InvalidState):
            await c.result(long)
        assert (await c.cancel(long, reason="test"))[0]["cancelled"] is True
        assert (await c.wait(long, timeout=20)).state is EffectState.CANCELLED
        await c.set_group_limit("g", 2)
        assert {"name": "g", "parallel": 2} in [
            {"name": g["name"], "parallel": g["parallel"]} for g in await c.groups()]
        await c.set_group_limit("g", None)
        freed = await c.gc(retain_count=1_000_000)
        assert set(freed) == {"removed", "freed_bytes", "kept", "kept_bytes"}
        with pytest.raises(NotFound):
            await c.status("0" * 26)

    run(daemon, body)


def test_twenty_concurrent_waits_on_one_client(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        # Submitted concurrently too: twenty submits in flight on one DEALER.
        ids = await asyncio.gather(*(c.submit_shell(f"sleep 0.{n % 5}; echo {n}; exit {n % 3}")
                                     for n in range(20)))
        assert len(set(ids)) == 20
        records = await asyncio.gather(*(c.wait(eid, timeout=30) for eid in ids))
        assert [r.id for r in records] == ids
        assert [r.exit_code for r in records] == [n % 3 for n in range(20)]
        outputs = await asyncio.gather(*(c.output(eid) for eid in ids))
        assert outputs == [b"%d\n" % n for n in range(20)]
        assert c.reconnects == 0

    run(daemon, body)


def test_as_completed_yields_in_completion_order(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        ids = [await c.submit_shell(f"sleep {s}") for s in ("0.6", "0.3", "0.1")]
        order = [rec.id async for rec in c.as_completed(ids, timeout=30)]
        assert order == ids[::-1]

    run(daemon, body)


@pytest.mark.slow
def test_as_completed_times_out(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        quick, slow = await c.submit_sleep(0.01), await c.submit_sleep(30)
        seen = []
        with pytest.raises(TimeoutError):
            async for rec in c.as_completed([quick, slow], timeout=1.0):
                seen.append(rec.id)
        assert seen == [quick]
        await c.cancel(slow)

    run(daemon, body)


def test_cancelling_a_waiting_task_leaves_the_client_usable(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        long = await c.submit_sleep(60)
        task = asyncio.create_task(c.wait(long))
        await asyncio.sleep(0.3)  # let the wait park in the daemon
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await c.hello())["pid"] > 0
        other = await c.submit_shell("echo fine")
        rec = await c.wait(other, timeout=20)
        assert rec.state is EffectState.SUCCEEDED
        # The parked wait's late reply (when ``long`` ends) is dropped by rid, not mistaken
        # for the answer to anything else.
        await c.cancel(long)
        assert (await c.wait(long, timeout=20)).state is EffectState.CANCELLED
        assert (await c.hello())["pid"] > 0
        assert c.reconnects == 0
        assert not c._inflight

    run(daemon, body)


def test_cancelling_a_stream_closes_its_socket(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        eid = await c.submit_shell("echo start; sleep 60")
        got = asyncio.Event()

        async def follow() -> None:
            async for _ in c.stream(eid):
                got.set()

        task = asyncio.create_task(follow())
        await asyncio.wait_for(got.wait(), 20)
        assert len(c._subs) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not c._subs
        assert (await c.hello())["pid"] > 0
        await c.cancel(eid)
        assert (await c.wait(eid, timeout=20)).state is EffectState.CANCELLED

    run(daemon, body)


async def _collect(c: AsyncClient, eid: str, **kwargs: Any) -> bytes:
    return b"".join([chunk.data async for chunk in c.stream(eid, **kwargs)])


def test_stream_is_exact_live_and_after_the_end(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        eid = await c.submit_shell("seq 1 100000")
        live, other = await asyncio.gather(_collect(c, eid, streams=("stdout",)),
                                           _collect(c, eid, streams=("stdout",)))
        assert live == other == SEQ_100K
        assert (await c.wait(eid, timeout=20)).succeeded
        # Starting after it finished: everything replays from the store, once.
        assert await _collect(c, eid, streams=("stdout",)) == SEQ_100K
        assert await _collect(c, eid, streams=("stdout",), from_offset=10) == SEQ_100K[10:]
        # Both streams, ordered within each.
        both = await c.submit_shell("seq 1 3; seq 4 6 >&2")
        chunks = [ch async for ch in c.stream(both)]
        assert b"".join(ch.data for ch in chunks if ch.stream == "stdout") == b"1\n2\n3\n"
        assert b"".join(ch.data for ch in chunks if ch.stream == "stderr") == b"4\n5\n6\n"

    run(daemon, body)


@pytest.mark.slow
def test_stream_fills_forced_drops_exactly(daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny high-water marks on the whole stream path (daemon, workers and our SUB) and a consumer
    # slower than the producer: PUB must drop, and the stream must fill every gap from the store.
    d = daemon_factory(env={"EFFECTD_STREAM_HWM": "2"})
    monkeypatch.setenv("EFFECTD_STREAM_HWM", "2")
    producer = ("import sys, time\n"
                "for i in range(60):\n"
                "    sys.stdout.buffer.write(bytes([65 + i % 26]) * 65535 + b'\\n'); sys.stdout.flush()\n"
                "    time.sleep(0.01)\n")
    expected = b"".join(bytes([65 + i % 26]) * 65535 + b"\n" for i in range(60))
    followers = record_followers(monkeypatch)

    async def body(c: AsyncClient) -> None:
        eid = await c.submit_shell(["python3", "-c", producer], max_output_bytes=64 * 1024 * 1024)
        data = bytearray()
        async for chunk in c.stream(eid, streams=("stdout",)):
            data += chunk.data
            await asyncio.sleep(0.05)  # a slow consumer (load shaping, not synchronisation)
        assert bytes(data) == expected
        f = followers[-1] if followers else None
        assert f is not None and f.gaps_filled + f.duplicates > 0, "no drop happened: proved nothing"

    run(d, body)


@pytest.mark.slow
def test_stream_ends_without_its_finished_event_despite_unrelated_traffic(
        daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The 'finished' event is lost (made unrecognisable here), and another subscriber keeps
    # the SUB socket busy with 'subscribed' events more often than the idle check: the stream
    # must still notice the effect is final from the store.
    import zmq
    import zmq.asyncio

    import effectd.client.aio as aio
    from effectd.ipc import codec as real_codec

    class LossyCodec:
        pack = staticmethod(real_codec.pack)
        MAX_WORKER_MESSAGE_BYTES = real_codec.MAX_WORKER_MESSAGE_BYTES

        @staticmethod
        def unpack(data: Any, **kwargs: Any) -> Any:
            msg = real_codec.unpack(data, **kwargs)
            if isinstance(msg, dict) and msg.get("event") == "finished":
                msg["event"] = "dropped"
            return msg

    monkeypatch.setattr(aio, "codec", LossyCodec)

    async def body(c: AsyncClient) -> None:
        eid = await c.submit_shell("echo before; sleep 1; echo after")
        stop = asyncio.Event()

        async def churn() -> None:
            sub = c.ctx.socket(zmq.SUB)
            sub.connect(c.endpoints.stream)
            try:
                while not stop.is_set():
                    sub.setsockopt(zmq.SUBSCRIBE, eid.encode())
                    await asyncio.sleep(0.1)
                    sub.setsockopt(zmq.UNSUBSCRIBE, eid.encode())
            finally:
                sub.close(linger=0)

        noise = asyncio.create_task(churn())
        try:
            data = await asyncio.wait_for(_collect(c, eid), 30)
        finally:
            stop.set()
            await noise
        assert data == b"before\nafter\n"

    run(daemon, body)


def test_stream_of_unknown_effect_raises(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        with pytest.raises(NotFound):
            await _collect(c, "0" * 26)
        assert not c._subs
        with pytest.raises(ValueError):
            await _collect(c, "0" * 26, streams=("nope",))

    run(daemon, body)


def test_lazy_pirate_resends_every_request_in_flight(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        eid = await c.submit_sleep(0.5)
        waiter = asyncio.create_task(c.wait(eid, timeout=20))
        await asyncio.sleep(0.1)
        # Pull the rug: the next request sees no reply on the old socket (as if the daemon
        # lost it), so its timeout reopens the DEALER and resends the parked wait too.
        old = c._sock
        assert old is not None
        c._reconnect()
        assert c.reconnects == 1 and c._sock is not old
        assert (await c.hello())["pid"] > 0
        rec = await waiter
        assert rec.state is EffectState.SUCCEEDED

    run(daemon, body)


def test_no_daemon_gives_daemon_unavailable_within_the_timeouts(daemon_factory: Any) -> None:
    daemon = daemon_factory("--kill-grace", "1")
    daemon.stop()

    async def body(c: AsyncClient) -> None:
        start = time.monotonic()
        with pytest.raises(DaemonUnavailable):
            await c.hello()
        assert time.monotonic() - start < 5

    run(daemon, body, timeout=0.3, retries=1)


@pytest.mark.slow
def test_request_timeout_reconnects_and_gives_up(daemon_factory: Any) -> None:
    # A daemon that is stopped (SIGSTOP) answers nothing: each attempt times out, the client
    # reconnects between attempts, and the call fails after 1 + retries attempts.
    import signal

    daemon = daemon_factory("--kill-grace", "1")

    async def body(c: AsyncClient) -> None:
        await c.hello()
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(DaemonUnavailable):
                await c.hello()
            elapsed = time.monotonic() - start
            assert 0.5 <= elapsed < 5, elapsed
            assert c.reconnects == 2
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert (await c.hello())["pid"] == daemon.pid

    run(daemon, body, timeout=0.3, retries=2)


@pytest.mark.slow
def test_autostart_starts_a_daemon(daemon_factory: Any) -> None:
    d = daemon_factory(start=False)

    async def body() -> None:
        async with AsyncClient(d.runtime, state=d.state, autostart=True) as c:
            # Two coroutines connecting at once start one daemon.
            a, b = await asyncio.gather(c.hello(), c.hello())
            assert a["pid"] == b["pid"] and a["managed_by"] != "systemd"
            # Stop it once its worker is ready (a daemon stopped while its first worker is
            # still starting waits for that worker's start-up timeout before exiting).
            deadline = time.monotonic() + 20
            while not any(w["state"] == "ready" for w in (await c.hello())["workers"]):
                assert time.monotonic() < deadline, "no worker became ready"
                await asyncio.sleep(0.02)  # bounded start-up poll
            with contextlib.suppress(DaemonUnavailable):
                await c.shutdown(drain=False)

    asyncio.run(body())
    from effectd.client.autostart import running_pid

    deadline = time.monotonic() + 20
    while running_pid(d.runtime) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # bounded wait for the autostarted daemon to exit
    assert running_pid(d.runtime) is None
