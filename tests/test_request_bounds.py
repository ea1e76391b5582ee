"""Bad input refused at the door, bounded replies, and ``wait`` agreeing with docs/protocol.md.

Every test talks to a real daemon over its control socket. Requests the reference client would
refuse to build are sent with a bare REQ socket (``RawReq``), as a hostile peer would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import zmq

from effectd.ipc import codec
from effectd.ipc.endpoints import Endpoints
from tests.conftest import DaemonHandle
from tests.test_protocol_robustness import RawReq, assert_error, req

MIB = 1024 * 1024
MAX_REPLY_BYTES = 48 * MIB
"""docs/protocol.md §2.3: the largest reply the daemon sends."""
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


# ---- 14.2: no request builds an unbounded reply; memory errors are answered --------------------

HEADROOM = 512 * MIB
"""Address space the daemon may grow by under the test's RLIMIT_AS (its start-up size is ~110 MiB):
enough for replies within the documented budget, far too little for a 1 GB reply."""


def _limit_address_space(pid: int, headroom: int) -> int:
    """Soft RLIMIT_AS = current size + ``headroom`` (inherited by the workers it spawns from now
    on); the hard limit is left alone so that the test can move the soft one both ways."""
    proc = psutil.Process(pid)
    limit = proc.memory_info().vms + headroom
    proc.rlimit(psutil.RLIMIT_AS, (limit, proc.rlimit(psutil.RLIMIT_AS)[1]))
    return int(limit)


def _raw_call(rq: RawReq, msg: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
    """(reply, its size in bytes); (None, 0) when no reply came."""
    rq.sock.send(_pack(msg))
    if not rq.sock.poll(20_000, zmq.POLLIN):
        rq.sock.close(linger=0)
        rq.sock = rq._open()
        return None, 0
    body = rq.sock.recv()
    return _unpack(body, max_bytes=len(body)), len(body)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hostile_requests_under_a_memory_limit_get_bounded_replies(daemon_factory: Any) -> None:
    d = daemon_factory("--min-workers", "0", "--kill-grace", "1")
    _limit_address_space(d.pid, HEADROOM)
    rq = RawReq(Endpoints.for_runtime(d.runtime).control)
    problems: list[str] = []
    try:
        # Records of ~15 MiB each (a 1 MiB command, 14 MiB of environment): four exceed the budget.
        big_env = {f"V{i}": "v" * (MIB - 16) for i in range(14)}
        effect = {"kind": "shell", "command": "#" * (MIB - 1), "env": big_env}
        ids = [ok(rq.call(req("submit", rid="s", effect=effect)))["id"] for _ in range(4)]
        for eid in ids:
            wait_final(rq, eid, timeout=60)  # E2BIG: spawn_failed; only the record size matters

        def check(what: str, msg: dict[str, Any], expect: str) -> dict[str, Any] | None:
            reply, size = _raw_call(rq, msg)
            if d.proc.poll() is not None:
                problems.append(f"{what}: the daemon died (exit {d.proc.returncode})")
                return None
            if reply is None:
                problems.append(f"{what}: no reply")
            elif size > MAX_REPLY_BYTES:
                problems.append(f"{what}: {size / MIB:.0f} MiB reply")
            elif ("ok" if reply["ok"] else reply["error"]["code"]) != expect:
                problems.append(f"{what}: {reply.get('error') or 'ok'} instead of {expect}")
            return reply

        # One id named 100 and 1000 times (27 KB request): de-duplicated, one record.
        for n in (100, 1000):
            reply = check(f"status x{n}", req("status", rid="st", ids=[ids[0]] * n), "ok")
            if reply and reply.get("ok") and len(reply["effects"]) != 1:
                problems.append(f"status x{n}: {len(reply['effects'])} records")
        check("status of 4 big", req("status", rid="st", ids=ids), "too_large")
        check("wait on 4 big", req("wait", rid="w", ids=ids, timeout=0), "too_large")
        # list pages at the budget: every effect exactly once over the pages.
        seen: list[str] = []
        before = None
        for _ in range(len(ids) + 1):
            reply = check("list page", req("list", rid="l", before=before) if before else req("list", rid="l"),
                          "ok")
            if not reply or not reply.get("ok") or not reply["effects"]:
                break
            seen += [r["id"] for r in reply["effects"]]
            before = seen[-1]
        if sorted(seen) != sorted(ids):
            problems.append(f"list pages returned {len(seen)} records for {len(ids)} effects")
        listed = [r.id for r in d.client().list()]  # the client follows 'truncated' pages itself
        if sorted(listed) != sorted(ids):
            problems.append(f"Client.list returned {len(listed)} records for {len(ids)} effects")
        assert not problems, problems
        # Squeezed to no headroom at all, a reply within the budget (3 records, 45 MiB) cannot be
        # built: the daemon answers that it ran out of memory, and keeps running.
        _limit_address_space(d.pid, 0)
        reply, _ = _raw_call(rq, req("status", rid="oom", ids=ids[:3]))
        assert d.proc.poll() is None, f"the daemon died:\n{d.log()}"
        assert reply is not None, "no answer once squeezed"
        if not reply["ok"]:  # (the allocator may still have had room: then it simply fits)
            assert_error(reply, "internal", "out of memory", rid="oom")
        _limit_address_space(d.pid, HEADROOM)
        # The daemon and a worker started under the limit still work.
        eid = ok(rq.call(req("submit", rid="s", effect={"kind": "shell", "command": "echo ok"})))["id"]
        assert wait_final(rq, eid)["state"] == "succeeded"
        assert ok(rq.call(req("read_output", rid="r", id=eid, stream="stdout")))["data"] == b"ok\n"
    finally:
        rq.close()
