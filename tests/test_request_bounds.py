"""Bad input refused at the door, bounded replies, and ``wait`` agreeing with docs/protocol.md.

Every test talks to a real daemon over its control socket. Requests the reference client would
refuse to build are sent with a bare REQ socket (``RawReq``), as a hostile peer would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from effectd.ipc.endpoints import Endpoints
from tests.conftest import DaemonHandle
from tests.test_protocol_robustness import RawReq, assert_error, req

MIB = 1024 * 1024


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
