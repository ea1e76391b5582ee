"""Bad input refused at the door, bounded replies, and ``wait`` agreeing with docs/protocol.md.

Every test talks to a real daemon over its control socket. Requests the reference client would
refuse to build are sent with a bare REQ socket (``RawReq``), as a hostile peer would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from effectd.ipc import codec
from effectd.ipc.endpoints import Endpoints
from tests.conftest import DaemonHandle
from tests.test_protocol_robustness import RawReq, assert_error, req

MIB = 1024 * 1024
_pack, _unpack = codec.pack, codec.unpack


@pytest.fixture
def rq(daemon: DaemonHandle) -> Iterator[RawReq]:
    sock = RawReq(Endpoints.for_runtime(daemon.runtime).control)
    yield sock
    sock.close()


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def wait_final(rq: RawReq, eid: str, timeout: float = 20.0) -> dict[str, Any]:
    reply = ok(rq.call(req("wait", rid="w", ids=[eid], timeout=timeout)))
    assert not reply["timed_out"], reply
    return reply["effects"][0]  # type: ignore[no-any-return]


# ---- 13.6: strings the kernel cannot take are refused at submit --------------------------------

SHELL = {"kind": "shell", "argv": ["/bin/true"]}
UNSPAWNABLE: list[tuple[dict[str, Any], str]] = [
    ({**SHELL, "env": {"A=B": "1"}}, "effect.env"),
    ({**SHELL, "env": {"A\0B": "1"}}, "effect.env"),
    ({**SHELL, "env": {"": "1"}}, "effect.env"),
    ({**SHELL, "env": {"A": "x\0y"}}, "effect.env.A"),
    ({**SHELL, "argv": ["/bin/echo", "a\0b"]}, "effect.argv[1]"),
    ({**SHELL, "argv": ["/bin/tr\0ue"]}, "effect.argv[0]"),
    ({**SHELL, "cwd": "/tmp\0x"}, "effect.cwd"),
    ({"kind": "shell", "command": "echo a\0b"}, "effect.command"),
    ({"kind": "python", "target": "os:getpid", "cwd": "/\0"}, "effect.cwd"),
]


@pytest.mark.timeout(30)
def test_unspawnable_strings_are_bad_request_at_submit(daemon: DaemonHandle, rq: RawReq) -> None:
    accepted = []
    for effect, field in UNSPAWNABLE:
        for op, args in (("submit", {"effect": effect}), ("submit_many", {"effects": [effect]})):
            reply = rq.call(req(op, rid="s", **args))
            if reply.get("ok"):
                accepted.append(f"{op} {effect}")
                continue
            assert_error(reply, "bad_request", field.replace("effect.", "effects[0].") if op == "submit_many"
                         else field, rid="s")
    assert not accepted, f"{len(accepted)}/{2 * len(UNSPAWNABLE)} accepted: {accepted}"
    assert not daemon.effect_ids(), "a refused effect was journaled"
    # The boundary: '=' inside a value is a valid environment entry.
    eid = ok(rq.call(req("submit", rid="s", effect={"kind": "shell", "argv": ["/bin/sh", "-c", "echo $A"],
                                                     "env": {"A": "x=y"}})))["id"]
    assert wait_final(rq, eid)["state"] == "succeeded"


@pytest.mark.timeout(30)
def test_read_output_past_the_end_reports_the_true_size(rq: RawReq) -> None:
    eid = ok(rq.call(req("submit", rid="s", effect={"kind": "shell", "command": "printf abc"})))["id"]
    assert wait_final(rq, eid)["state"] == "succeeded"
    for offset in (3, 4, 1000, 2**40):
        r = ok(rq.call(req("read_output", rid="r", id=eid, stream="stdout", offset=offset)))
        assert (r["data"], r["next_offset"], r["size"], r["eof"]) == (b"", offset, 3, True), r
    r = ok(rq.call(req("read_output", rid="r", id=eid, stream="stderr", offset=10)))
    assert (r["size"], r["eof"]) == (0, True), r


# ---- 14.7 (c), (d): wait as docs/protocol.md §5.6 and §7.1 describe it -------------------------


@pytest.mark.timeout(30)
def test_parked_wait_on_an_effect_gc_deletes_wakes_at_once_with_not_found(daemon: DaemonHandle,
                                                                          rq: RawReq) -> None:
    # §5.6: "If a waited-for effect is deleted by retention while parked, the wait is answered
    # with not_found." Parked on [done, running]: gc can only delete the final one.
    done = ok(rq.call(req("submit", rid="s", effect={"kind": "sleep", "seconds": 0})))["id"]
    wait_final(rq, done)
    running = ok(rq.call(req("submit", rid="s", effect={"kind": "sleep", "seconds": 60})))["id"]
    parked = RawReq(Endpoints.for_runtime(daemon.runtime).control)
    try:
        parked.sock.send(_pack(req("wait", rid="parked", ids=[done, running], timeout=20)))
        assert not parked.sock.poll(300), "the wait must be parked"
        assert ok(rq.call(req("gc", rid="gc", retain_count=0)))["removed"] == 1
        started = time.monotonic()
        assert parked.sock.poll(3000), "the parked wait was not woken by gc"
        reply = _unpack(parked.sock.recv())
        assert_error(reply, "not_found", done, rid="parked")
        assert time.monotonic() - started < 3
    finally:
        parked.close()
        rq.call(req("cancel", rid="c", ids=[running]))


@pytest.mark.timeout(30)
def test_wait_status_and_list_return_one_record_shape(rq: RawReq) -> None:
    # §7.1: "status, list and wait return records with these fields", spec included.
    effect = {"kind": "shell", "argv": ["/bin/sh", "-c", "echo $A"], "env": {"A": "1", "B": "2"}}
    eid = ok(rq.call(req("submit", rid="s", effect=effect)))["id"]
    waited = wait_final(rq, eid)
    status = ok(rq.call(req("status", rid="st", ids=[eid])))["effects"][0]
    listed = next(r for r in ok(rq.call(req("list", rid="l")))["effects"] if r["id"] == eid)
    assert waited["spec"]["env"] == {"A": "1", "B": "2"}, waited["spec"]
    assert waited == status == listed
