"""docs/protocol.md followed literally (tests/protocol_doc_client.py) against a real daemon, and
the reference clients held to the same rules.

* A ``drain: false`` stop with many parked waits: every wait gets an answer, even when the client
  reads it only after the daemon has exited (§1.2 socket options, §5.6).
* With no daemon, the documented REQ send does not block, and the §10.3 retry loop ends.
* The §9 loop handles every message it receives, also after a quiet period (progress events).
* A subscription topic over the stream socket's limit is refused client-side (§8.1).
* ``sizes`` after retries is whole-file, for the streams the last attempt wrote (§7.1).
* A restart shows only in ``hello.instance``; subscriptions come back by themselves (§10.4).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from effectd.client.aio import AsyncClient
from effectd.ipc.endpoints import MAX_SUBSCRIPTION_TOPIC_BYTES
from effectd.ipc.errors import BadRequest
from tests.protocol_doc_client import DocClient, DocError, DocUnavailable, unpack

PARKED_WAITS = 40


def park_waits(doc: DocClient, eid: str, count: int) -> list[zmq.Socket[bytes]]:
    """``count`` waits, each on its own REQ socket (§5.6), all parked in the daemon, which runs
    with ``--max-waits count``: parked once a probe wait is refused with ``too_many_waits``."""
    socks = []
    for _ in range(count):
        sock = doc.req_socket()
        doc.send(sock, doc.request("wait", ids=[eid], timeout=30))
        socks.append(sock)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            doc.call("wait", ids=[eid], timeout=0.05)  # parked briefly while waits are missing
        except DocError as exc:
            if exc.code == "too_many_waits":
                return socks
            raise
        for sock in socks:  # the probe took a slot first: that wait was refused, send it again
            if sock.poll(0, zmq.POLLIN):
                refused = unpack(sock.recv())
                assert refused["error"]["code"] == "too_many_waits", refused
                doc.send(sock, doc.request("wait", ids=[eid], timeout=30))
    raise AssertionError("the waits were not all parked within 20 s")


@pytest.mark.slow
def test_every_parked_wait_is_answered_by_a_drain_false_stop(daemon_factory: Any) -> None:
    d = daemon_factory("--kill-grace", "1", "--max-waits", str(PARKED_WAITS))
    doc = DocClient(d.runtime)
    try:
        eid = doc.call("submit", effect={"kind": "sleep", "seconds": 60})["id"]
        socks = park_waits(doc, eid, PARKED_WAITS)
        assert doc.call("shutdown", drain=False)["stopping"] is True
        # Read nothing until the daemon is gone: the replies it sent before exiting must wait
        # in the client's queue, not vanish with the connection.
        assert d.proc.wait(30) == 0
        answers: dict[str, int] = {}
        for sock in socks:
            if sock.poll(1000, zmq.POLLIN):
                reply = unpack(sock.recv())
                key = "timed_out" if reply["ok"] and reply["timed_out"] else reply.get("error", {}).get("code")
                answers[key] = answers.get(key, 0) + 1
        answered = sum(answers.values())
        assert answered == PARKED_WAITS, f"{answered}/{PARKED_WAITS} parked waits answered: {answers}"
        assert set(answers) <= {"timed_out", "unavailable"}, answers
    finally:
        doc.close()


@pytest.mark.slow
def test_documented_retry_loop_ends_without_a_daemon_and_finds_a_new_one(daemon_factory: Any) -> None:
    d = daemon_factory("--kill-grace", "1", start=False)
    doc = DocClient(d.runtime, timeout=0.3, retries=1)
    try:
        started = time.monotonic()
        with pytest.raises(DocUnavailable):
            doc.call("hello")  # nothing listens: the sends must not block, the loop gives up
        assert time.monotonic() - started < 2.0
        d.start()
        doc.timeout = 5.0
        assert doc.call("hello")["ok"] is True
    finally:
        doc.close()


@pytest.mark.slow
def test_follow_loop_handles_every_message_after_quiet_periods(daemon: Any, tmp_path: Path) -> None:
    """Progress events come one per 0.3 s, never advancing a stream: each arrives after a
    quiet period longer than the idle check, which must not throw the message away."""
    gate = tmp_path / "gate"
    command = (f"while [ ! -e {gate} ]; do sleep 0.01; done; "
               "for i in 1 2 3 4; do echo \"0.$i step $i\" >&3; sleep 0.3; done; echo done")
    doc = DocClient(daemon.runtime, idle=0.1)
    try:
        eid = doc.call("submit", effect={"kind": "shell", "command": command})["id"]
        out = doc.follow(eid, after_catch_up=gate.touch)
        assert out == {"stdout": b"done\n", "stderr": b""}
        progress = [e["message"] for e in doc.events if e.get("event") == "progress"]
        assert progress == [f"step {i}" for i in (1, 2, 3, 4)], doc.events
    finally:
        doc.close()


@pytest.mark.slow
def test_long_subscription_topic_is_refused_client_side(daemon: Any) -> None:
    too_long = "X" * (MAX_SUBSCRIPTION_TOPIC_BYTES + 1)
    c = daemon.client()
    started = time.monotonic()
    with pytest.raises(BadRequest, match=f"longer than {MAX_SUBSCRIPTION_TOPIC_BYTES} bytes"):
        next(c.stream(too_long))
    assert time.monotonic() - started < 1.0  # refused before subscribing, not by the daemon

    async def aio() -> None:
        async with AsyncClient(daemon.runtime, state=daemon.state, autostart=False) as ac:
            with pytest.raises(BadRequest, match=f"longer than {MAX_SUBSCRIPTION_TOPIC_BYTES} bytes"):
                await ac.stream(too_long).__anext__()

    asyncio.run(aio())
    # One byte less still works on the wire (a SUB socket with it is not disconnected).
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(f"ipc://{daemon.runtime}/stream.sock")
        sub.setsockopt(zmq.SUBSCRIBE, b"X" * MAX_SUBSCRIPTION_TOPIC_BYTES)
        sub.setsockopt(zmq.SUBSCRIBE, b"0" * 26)
        assert sub.poll(10_000, zmq.POLLIN), "no 'subscribed' event: the socket was disconnected"
        assert unpack(sub.recv_multipart()[1])["event"] == "subscribed"
    finally:
        ctx.destroy(linger=0)


@pytest.mark.slow
def test_sizes_after_retries_are_whole_files_of_streams_the_last_attempt_wrote(daemon: Any,
                                                                               tmp_path: Path) -> None:
    mark = tmp_path / "first-attempt-done"
    command = (f"if [ -e {mark} ]; then echo second; exit 0; fi; "
               f"touch {mark}; echo first; echo warn >&2; exit 1")
    doc = DocClient(daemon.runtime)
    try:
        eid = doc.call("submit", effect={"kind": "shell", "command": command, "retries": 1,
                                         "retry_backoff": 0})["id"]
        rec = doc.call("wait", ids=[eid], timeout=20, reply_timeout=25)["effects"][0]
        assert (rec["state"], rec["attempt"]) == ("succeeded", 2), rec
        # stdout: both attempts' bytes ("first\nsecond\n"), not the last attempt's 7 bytes;
        # stderr: written only by attempt 1, so absent although its file holds 5 bytes.
        assert rec["sizes"] == {"stdout": 13}, rec["sizes"]
        assert doc.read_output(eid, "stdout", 0, 64)["data"] == b"first\nsecond\n"
        assert doc.read_output(eid, "stderr", 0, 1)["size"] == 5
    finally:
        doc.close()


@pytest.mark.slow
def test_restart_is_visible_only_in_instance_and_subscriptions_come_back(daemon: Any) -> None:
    """§10.4: across a daemon restart, the same REQ socket just gets answers (no timeout, no
    error: only ``hello.instance`` tells), and a SUB socket gets a new ``subscribed`` event."""
    doc = DocClient(daemon.runtime)
    ctx = zmq.Context()
    try:
        first = doc.call("hello")["instance"]
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(f"ipc://{daemon.runtime}/stream.sock")
        sub.setsockopt(zmq.SUBSCRIBE, b"0" * 26)
        assert sub.poll(10_000, zmq.POLLIN)
        assert unpack(sub.recv_multipart()[1])["event"] == "subscribed"
        assert daemon.stop() == 0
        daemon.start()
        assert doc.call("hello")["instance"] != first
        assert sub.poll(10_000, zmq.POLLIN), "no 'subscribed' event after the restart"
        assert unpack(sub.recv_multipart()[1])["event"] == "subscribed"
    finally:
        ctx.destroy(linger=0)
        doc.close()
