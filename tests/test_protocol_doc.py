"""docs/protocol.md followed literally (tests/protocol_doc_client.py) against a real daemon, and
the reference clients held to the same rules.

* A ``drain: false`` stop with many parked waits: every wait gets an answer, even when the client
  reads it only after the daemon has exited (§1.2 socket options, §5.6).
* With no daemon, the documented REQ send does not block, and the §10.3 retry loop ends.
* The §9 loop handles every message it receives, also after a quiet period (progress events).
* A subscription topic over the stream socket's limit is refused client-side (§8.1).
* ``sizes`` after retries is whole-file, for the streams the last attempt wrote (§7.1).
* A restart shows only in ``hello.instance``; subscriptions come back by themselves (§10.4).
* Every message table (requests, replies, records, stream headers, worker messages) lists
  exactly the fields the declarations in effectd/ipc have, so the doc cannot drift.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
import zmq

from effectd.client.aio import AsyncClient
from effectd.ipc.endpoints import MAX_SUBSCRIPTION_TOPIC_BYTES
from effectd.ipc.errors import BadRequest
from effectd.ipc.messages import DAEMON_MESSAGES, WORKER_MESSAGES, ChunkHeader, EventHeader, EventType, RunningReport
from effectd.ipc.records import REPLIES, EffectRecord
from effectd.ipc.schema import EFFECT_FIELDS, OPS, REQUEST_ENVELOPE
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


# --------------------------------------------------------------------------------------------
# protocol.md's message tables against the declarations in effectd/ipc (schema.py field tables
# for requests, records.py for replies and records, messages.py for stream headers and worker
# messages): every declared field is documented in its message's table, and nothing else is.

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
ENVELOPE = {"v", "rid", "ok"}


def _section(heading: str) -> str:
    """The text under the first heading starting with ``heading`` (up to the next heading of the
    same or a higher level)."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    level = len(heading) - len(heading.lstrip("#"))
    end = next((j for j in range(start + 1, len(lines))
                if lines[j].startswith("#") and len(lines[j]) - len(lines[j].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start + 1:end])


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in ``text``: each a list of rows (header first, separator dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-", ":"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _names(cell: str) -> set[str]:
    """Field names in a table cell: backticked identifiers outside parentheses (those list
    values or limits), with the part before ``:`` (``state: "running"``)."""
    while re.search(r"\([^()]*\)", cell):
        cell = re.sub(r"\([^()]*\)", "", cell)
    return set(re.findall(r"`([a-z_][a-z0-9_]*)(?::[^`]*)?`", cell))


def _column(table: list[list[str]]) -> set[str]:
    return set().union(*(_names(row[0]) for row in table[1:]))


def _same(where: str, documented: set[str], declared: set[str]) -> None:
    assert documented == declared, \
        f"{where}: only in the doc {sorted(documented - declared)}, only in the code {sorted(declared - documented)}"


def _fields(cls: type[msgspec.Struct]) -> set[str]:
    return set(cls.__struct_fields__)


def _request_and_reply_tables(op: str) -> tuple[list[list[list[str]]], list[list[list[str]]]]:
    number = list(OPS).index(op) + 1
    tables = [t for t in _tables(_section(f"### 5.{number} `{op}`")) if t[0][0] == "field"]
    return [t for t in tables if "req" in t[0]], [t for t in tables if "req" not in t[0]]


@pytest.mark.parametrize("op", list(OPS))
def test_every_request_field_is_in_its_ops_table_and_back(op: str) -> None:
    requests, _ = _request_and_reply_tables(op)
    declared = _fields(OPS[op].args)  # the struct; tests/test_typed_messages.py holds it to the Field table
    documented = _column(requests[0]) if requests else set()
    _same(f"§5 {op} request", documented, declared)


@pytest.mark.parametrize("op", list(OPS))
def test_every_reply_field_is_in_its_ops_reply_table_and_back(op: str) -> None:
    _, replies = _request_and_reply_tables(op)
    assert len(replies) == 1, f"§5 {op}: expected one reply table, found {len(replies)}"
    declared = _fields(REPLIES[op]) - ENVELOPE
    documented = _column(replies[0])
    _same(f"§5 {op} reply", documented, declared)


def test_every_op_has_a_declared_reply() -> None:
    assert set(REPLIES) == set(OPS)


def test_envelope_effect_spec_record_and_chunk_tables_match_the_declarations() -> None:
    cases = [
        ("### 3.1", {f.name for f in REQUEST_ENVELOPE}),
        ("### 6.1", {f.name for f in EFFECT_FIELDS}),
        ("### 7.1", _fields(EffectRecord)),
        ("### 8.2", _fields(ChunkHeader)),
    ]
    for heading, declared in cases:
        documented = _column(_tables(_section(heading))[0])
        _same(heading, documented, declared)
    reply = _tables(_section("### 3.2"))  # the envelope shown as JSON: v, rid, ok (and error)
    assert not reply
    assert all(f'"{name}"' in _section("### 3.2") for name in ENVELOPE)


def test_event_table_matches_the_event_header() -> None:
    table = _tables(_section("### 8.3"))[0]
    events = {row[0].strip("`") for row in table[1:]}
    assert events == set(get_args(EventType))
    documented = set().union(*(_names(row[1]) for row in table[1:]))
    declared = _fields(EventHeader) - {"event"}  # ``stream`` is the tag, ``event`` the row
    _same("§8.3", documented, declared)


@pytest.mark.parametrize("table_index, classes", [(0, WORKER_MESSAGES), (1, DAEMON_MESSAGES)])
def test_worker_message_tables_match_the_declarations(table_index: int, classes: tuple[Any, ...]) -> None:
    table = _tables(_section("## 12."))[table_index]
    rows = {row[0].strip("`"): row[1] for row in table[1:]}
    declared = {cls.__struct_config__.tag: cls for cls in classes}
    assert set(rows) == set(declared), "§12: message types"
    for tag, cls in declared.items():
        documented = _names(rows[tag])
        _same(f"§12 {tag}", documented, _fields(cls))
    if table_index == 0:  # the running reports inside ``ready``
        shape = re.search(r"`\{([^}]*)\}`", rows["ready"])
        assert shape is not None
        assert {name.strip(" ?") for name in shape.group(1).split(",")} == _fields(RunningReport)
