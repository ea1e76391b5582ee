"""The control socket under hostile input: raw REQ and DEALER sockets send garbage, truncated or
non-map msgpack, wrong types, missing fields, wrong versions, huge numbers, NaN, deep nesting,
ext types, multipart garbage and oversized frames. Every malformed request gets the documented
error reply (or, over 16 MiB, a dropped connection), nothing is journaled, and the daemon keeps
answering ``hello``. A bounded hypothesis fuzz test ends with a check on the daemon's memory.

Wire format (docs/protocol.md): one msgpack map per frame, ``{"v": 1, "rid": ..., "op": ...}``;
replies ``{"v": 1, "rid": ..., "ok": true, ...}`` or ``{"ok": false, "error": {code, message}}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effectd.client import Client
from effectd.ipc.endpoints import Endpoints
from tests.conftest import DaemonHandle

MIB = 1024 * 1024
REPLY_TIMEOUT_MS = 5000
UNKNOWN_ID = "0" * 26


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def req(op: str | None = "hello", rid: Any = "r-1", v: Any = 1, **fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": v, "rid": rid, "op": op}
    msg.update(fields)
    return {k: val for k, val in msg.items() if val is not _ABSENT}


_ABSENT = object()
"""Pass as a field value to leave the key out of the request map."""


class RawReq:
    """A bare REQ socket on the control endpoint; recreated when a request got no reply."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.sock = self._open()

    def _open(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def raw(self, data: bytes, timeout_ms: int = REPLY_TIMEOUT_MS) -> dict[str, Any] | None:
        self.sock.send(data)
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            self.sock.close(linger=0)
            self.sock = self._open()
            return None
        reply = unpack(self.sock.recv())
        assert isinstance(reply, dict), reply
        return reply

    def call(self, msg: Any) -> dict[str, Any]:
        reply = self.raw(pack(msg))
        assert reply is not None, f"no reply to {str(msg)[:200]}"
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class RawDealer:
    """A bare DEALER socket: any frames out; replies arrive as ``["", body]``."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> dict[str, Any] | None:
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart()
        assert len(frames) == 2 and frames[0] == b"", frames[:3]
        reply = unpack(frames[1])
        assert isinstance(reply, dict)
        return reply

    def call(self, frames: list[bytes]) -> dict[str, Any]:
        self.send(frames)
        reply = self.recv()
        assert reply is not None, f"no reply to frames {[f[:40] for f in frames]}"
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def assert_error(reply: dict[str, Any], code: str, *words: str, rid: Any = _ABSENT) -> str:
    """The reply is a well-formed error with ``code``, and its message contains ``words``."""
    assert reply.get("ok") is False, reply
    assert reply.get("v") == 1, reply
    err = reply.get("error")
    assert isinstance(err, dict), reply
    assert err.get("code") == code, reply
    message = err.get("message")
    assert isinstance(message, str) and message, reply
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    if rid is not _ABSENT:
        assert reply.get("rid") == rid, reply
    return message


def effect_count(d: DaemonHandle) -> int:
    return len(d.effect_ids())


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(shared_daemon: DaemonHandle) -> Iterator[DaemonHandle]:
    """One daemon takes all the abuse of this module; it must still be the same process at the
    end, answering hello, having journaled nothing it refused."""
    d = shared_daemon
    pid = d.pid
    yield d
    assert d.proc is not None and d.proc.poll() is None, f"daemon died:\n{d.log()}"
    with Client(d.runtime, state=d.state, autostart=False, retries=0) as c:
        assert c.hello()["pid"] == pid


@pytest.fixture
def endpoint(shared: DaemonHandle) -> str:
    return Endpoints.for_runtime(shared.runtime).control


@pytest.fixture
def rq(endpoint: str, shared: DaemonHandle) -> Iterator[RawReq]:
    sock = RawReq(endpoint)
    before = effect_count(shared)
    yield sock
    try:
        # After every test: the daemon still answers, and refused requests journaled nothing.
        hello = sock.call(req("hello", rid="final"))
        assert hello["ok"] is True and hello["rid"] == "final" and hello["pid"] == shared.pid
        assert effect_count(shared) == before
    finally:
        sock.close()


@pytest.fixture
def dealer(endpoint: str) -> Iterator[RawDealer]:
    sock = RawDealer(endpoint)
    yield sock
    sock.close()


# ---- undecodable and non-map messages -------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"",                       # empty body
    b"\xc1",                   # the one byte msgpack never uses
    b"hello daemon",           # text, not msgpack
    b"\xff" * 64,              # negative fixints: trailing data after the first
    bytes(range(256)),
    b"\x81\xa2op",             # a map whose only key has no value: truncated
    b"\xdf\xff\xff\xff\xff",   # map32 claiming 4 billion entries, none present
    b"\xdd\x7f\xff\xff\xff",   # array32 claiming 2 billion entries
    b"\xdb\x7f\xff\xff\xff",   # str32 claiming 2 GiB
    b"\xc6\xff\xff\xff\xff",   # bin32 claiming 4 GiB
], ids=["empty", "c1", "text", "ff", "all-bytes", "trunc-map", "map32", "array32", "str32", "bin32"])
def test_garbage_bytes_are_bad_request(rq: RawReq, data: bytes) -> None:
    reply = rq.raw(data)
    assert reply is not None
    assert_error(reply, "bad_request", rid=None)


def test_truncated_msgpack_at_every_length(rq: RawReq) -> None:
    full = pack(req("status", rid="trunc", ids=[UNKNOWN_ID]))
    for cut in range(len(full)):
        reply = rq.raw(full[:cut])
        assert reply is not None, cut
        assert_error(reply, "bad_request", rid=None)
    assert_error(rq.call(unpack(full)), "not_found", UNKNOWN_ID, rid="trunc")


def test_trailing_bytes_refused(rq: RawReq) -> None:
    reply = rq.raw(pack(req("hello")) + b"\x00")
    assert reply is not None
    assert_error(reply, "bad_request", "trailing", rid=None)


@pytest.mark.parametrize("value", [[1, 2], "hello", 7, None, True, 1.5, b"bytes", []],
                         ids=["array", "str", "int", "nil", "bool", "float", "bin", "empty-array"])
def test_non_map_messages_are_bad_request(rq: RawReq, value: Any) -> None:
    assert_error(rq.call(value), "bad_request", "must be a map", rid=None)


def test_non_string_map_keys(rq: RawReq) -> None:
    reply = rq.raw(b"\x81\x01\x02")  # {1: 2}
    assert reply is not None
    assert_error(reply, "bad_request", rid=None)
    # bin keys decode, but are not the field names: v is "missing"
    assert_error(rq.call({b"v": 1, b"op": b"hello"}), "bad_request", "v", rid=None)


# ---- the envelope ---------------------------------------------------------------------------


def test_map_without_op(rq: RawReq) -> None:
    assert_error(rq.call({"v": 1, "rid": "no-op"}), "bad_request", "op", "required", rid="no-op")
    assert_error(rq.call({"v": 1, "rid": "nil-op", "op": None}), "bad_request", "op", rid="nil-op")


def test_map_without_version(rq: RawReq) -> None:
    assert_error(rq.call({"rid": 5, "op": "hello"}), "bad_request", "v", "required", rid=5)


def test_empty_map(rq: RawReq) -> None:
    assert_error(rq.call({}), "bad_request", rid=None)


@pytest.mark.parametrize("op", ["frobnicate", "", "HELLO", "hello ", "x" * 64, "__init__", "op_hello"])
def test_unknown_op(rq: RawReq, op: str) -> None:
    message = assert_error(rq.call(req(op, rid="u")), "unknown_op", rid="u")
    assert "hello" in message  # the message lists the known ops


def test_op_of_wrong_type_or_too_long(rq: RawReq) -> None:
    for op in (1, ["hello"], {"x": 1}, b"hello", True):
        assert_error(rq.call(req(op, rid="t")), "bad_request", "op", rid="t")  # type: ignore[arg-type]
    assert_error(rq.call(req("x" * 65, rid="t")), "bad_request", "op", rid="t")


@pytest.mark.parametrize("v", [2, 0, 99, 2**31])
def test_unsupported_version(rq: RawReq, v: int) -> None:
    message = assert_error(rq.call(req("hello", rid="ver", v=v)), "unsupported_version", rid="ver")
    assert message.endswith("1..1"), message


@pytest.mark.parametrize("v", [-1, 2**31 + 1, 2**64 - 1, -(2**63), "1", 1.0, True, None, [1]])
def test_bad_version_values(rq: RawReq, v: Any) -> None:
    assert_error(rq.call(req("hello", rid="bv", v=v)), "bad_request", "v", rid="bv")


def test_rid_is_echoed_or_nil(rq: RawReq) -> None:
    for rid in ("abc", "", "x" * 128, 0, -1, 2**63 - 1, -(2**63) + 1):
        reply = rq.call(req("hello", rid=rid))
        assert reply["ok"] is True and reply["rid"] == rid
    assert rq.call(req("hello", rid=_ABSENT))["rid"] is None
    for bad in ("x" * 129, 2**63, 2**64 - 1, -(2**63), 1.5, True, False, [1], {"a": 1}, b"bin"):
        assert_error(rq.call(req("hello", rid=bad)), "bad_request", "rid", rid=None)


def test_unknown_top_level_field(rq: RawReq) -> None:
    assert_error(rq.call(req("hello", rid="f", extra=1)), "bad_request", "extra", "unknown field",
                 rid="f")
    # a key that is not a field is refused even when nil
    assert_error(rq.call(req("status", rid="f", ids=[UNKNOWN_ID], bogus=None)), "bad_request",
                 "bogus", rid="f")


# ---- submit: every field with a wrong type or value -----------------------------------------

SHELL = {"kind": "shell", "command": "true", "cwd": "/"}
PYTHON = {"kind": "python", "target": "effectd_test_effects:add", "args": [1, 2], "cwd": "/"}
SLEEP = {"kind": "sleep", "seconds": 0.01}

BAD_EFFECT_FIELDS: list[tuple[dict[str, Any], str, Any]] = [
    (SHELL, "kind", 1), (SHELL, "kind", "bogus"), (SHELL, "kind", None), (SHELL, "kind", ["shell"]),
    (SHELL, "argv", "true"), (SHELL, "argv", [1]), (SHELL, "argv", [None]),
    (SHELL, "command", 1), (SHELL, "command", b"true"), (SHELL, "command", ["true"]),
    (SHELL, "cwd", 1), (SHELL, "cwd", ["/"]),
    (SHELL, "env", ["A=1"]), (SHELL, "env", {"A": 1}), (SHELL, "env", {"A": None}), (SHELL, "env", "A=1"),
    (PYTHON, "target", 1), (PYTHON, "target", "no_colon"), (PYTHON, "target", "a:b:c"),
    (PYTHON, "target", "1mod:f"), (PYTHON, "target", "mod:"), (PYTHON, "target", ":f"),
    (PYTHON, "args", {"a": 1}), (PYTHON, "args", "1,2"),
    (PYTHON, "kwargs", [1]), (PYTHON, "kwargs", "a=1"),
    (SLEEP, "seconds", "1"), (SLEEP, "seconds", -1), (SLEEP, "seconds", math.nan),
    (SLEEP, "seconds", math.inf), (SLEEP, "seconds", True), (SLEEP, "seconds", 2**64 - 1),
    (SLEEP, "name", 1), (SLEEP, "name", "n" * 257),
    (SLEEP, "labels", {"a": 1}), (SLEEP, "labels", ["a"]), (SLEEP, "labels", {"a": None}),
    (SLEEP, "labels", {f"k{i}": "v" for i in range(65)}),
    (SLEEP, "timeout", "x"), (SLEEP, "timeout", 0), (SLEEP, "timeout", -1), (SLEEP, "timeout", math.nan),
    (SLEEP, "timeout", math.inf), (SLEEP, "timeout", -math.inf), (SLEEP, "timeout", True),
    (SLEEP, "retries", 1.5), (SLEEP, "retries", True), (SLEEP, "retries", -1), (SLEEP, "retries", 101),
    (SLEEP, "retries", "1"), (SLEEP, "retries", 2**64 - 1),
    (SLEEP, "retry_backoff", "x"), (SLEEP, "retry_backoff", -1), (SLEEP, "retry_backoff", math.nan),
    (SLEEP, "priority", 1.0), (SLEEP, "priority", 2**40), (SLEEP, "priority", -(2**63)),
    (SLEEP, "group", 1), (SLEEP, "group", "g" * 129),
    (SLEEP, "after", UNKNOWN_ID), (SLEEP, "after", ["not-an-id"]), (SLEEP, "after", [1]),
    (SLEEP, "after_any_outcome", 1), (SLEEP, "after_any_outcome", "yes"),
    (SHELL, "stdin_from", "x"), (SHELL, "stdin_from", 1),
    (SLEEP, "max_output_bytes", 10), (SLEEP, "max_output_bytes", 1.5), (SLEEP, "max_output_bytes", 2**62),
    (SHELL, "rlimits", {"as": "x"}), (SHELL, "rlimits", {"bogus": 1}), (SHELL, "rlimits", [1]),
    (SHELL, "bogus_field", 1),
    # fields that exist but not for this kind
    (SLEEP, "command", "true"), (SLEEP, "target", "m:f"), (SHELL, "seconds", 1), (PYTHON, "argv", ["x"]),
    (PYTHON, "env", {"A": "1"}), (SHELL, "args", [1]),
]


@pytest.mark.parametrize(("base", "name", "value"), BAD_EFFECT_FIELDS,
                         ids=[f"{b['kind']}-{n}-{str(v)[:20]}" for b, n, v in BAD_EFFECT_FIELDS])
def test_submit_field_with_wrong_type_or_value(rq: RawReq, base: dict[str, Any], name: str,
                                               value: Any) -> None:
    effect = {**base, name: value}
    reply = rq.call(req("submit", rid="s", effect=effect, request_key="k-wrong"))
    # the message names the offending field (a nil kind is "missing": named too)
    assert_error(reply, "bad_request", f"effect.{name}", rid="s")


def test_submit_envelope_fields_wrong(rq: RawReq) -> None:
    for effect in ([SLEEP], "sleep", 1, True):
        assert_error(rq.call(req("submit", rid="e", effect=effect)), "bad_request", "effect", rid="e")
    for key in (1, ["k"], "k" * 129):
        assert_error(rq.call(req("submit", rid="e", effect=SLEEP, request_key=key)), "bad_request",
                     "request_key", rid="e")
    for effects in (SLEEP, [], [SLEEP, "x"], [1]):
        assert_error(rq.call(req("submit_many", rid="e", effects=effects)), "bad_request", "effects",
                     rid="e")
    reply = rq.call(req("submit_many", rid="e", effects=[SLEEP, {**SLEEP, "seconds": -1}]))
    assert_error(reply, "bad_request", "effects[1].seconds", rid="e")  # atomic: neither journaled


@pytest.mark.parametrize(("msg", "field"), [
    (req("submit", effect=_ABSENT), "effect"),
    (req("submit", effect=None), "effect"),
    (req("submit", effect={"command": "true"}), "effect.kind"),
    (req("submit", effect={"kind": "shell"}), "effect.argv"),
    (req("submit", effect={"kind": "shell", "argv": ["true"], "command": "true"}), "effect.argv"),
    (req("submit", effect={"kind": "python"}), "effect.target"),
    (req("submit", effect={"kind": "sleep"}), "effect.seconds"),
    (req("submit_many"), "effects"),
    (req("status"), "ids"),
    (req("status", ids=[]), "ids"),
    (req("wait"), "ids"),
    (req("cancel"), "ids"),
    (req("result"), "id"),
    (req("read_output", id=UNKNOWN_ID), "stream"),
    (req("read_output", stream="stdout"), "id"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_missing_fields_named(rq: RawReq, msg: dict[str, Any], field: str) -> None:
    msg = {**msg, "rid": "m"}
    assert_error(rq.call(msg), "bad_request", field, rid="m")


# ---- other ops: huge integers, NaN, wrong types ---------------------------------------------


@pytest.mark.parametrize(("msg", "field"), [
    (req("status", ids=[UNKNOWN_ID] * 10_001), "ids"),
    (req("status", ids=UNKNOWN_ID), "ids"),
    (req("status", ids=["short"]), "ids[0]"),
    (req("status", ids=["0" * 25 + "a"]), "ids[0]"),  # lower case is not an id
    (req("status", ids=["I" * 26]), "ids[0]"),  # I is not in Crockford base32
    (req("list", limit=0), "limit"),
    (req("list", limit=2**64 - 1), "limit"),
    (req("list", limit=-(2**63)), "limit"),
    (req("list", limit=10.0), "limit"),
    (req("list", states=["nope"]), "states"),
    (req("list", states="running"), "states"),
    (req("list", labels={"a": 1}), "labels.a"),
    (req("list", before="x"), "before"),
    (req("wait", ids=[UNKNOWN_ID], timeout=math.nan), "timeout"),
    (req("wait", ids=[UNKNOWN_ID], timeout=math.inf), "timeout"),
    (req("wait", ids=[UNKNOWN_ID], timeout=-1), "timeout"),
    (req("wait", ids=[UNKNOWN_ID], timeout=3601), "timeout"),
    (req("wait", ids=[UNKNOWN_ID], timeout=2**64 - 1), "timeout"),
    (req("wait", ids=[UNKNOWN_ID], return_when="any"), "return_when"),
    (req("read_output", id=UNKNOWN_ID, stream="stdin"), "stream"),
    (req("read_output", id=UNKNOWN_ID, stream="stdout", offset=-1), "offset"),
    (req("read_output", id=UNKNOWN_ID, stream="stdout", offset=2**63), "offset"),
    (req("read_output", id=UNKNOWN_ID, stream="stdout", max_bytes=0), "max_bytes"),
    (req("read_output", id=UNKNOWN_ID, stream="stdout", max_bytes=2**64 - 1), "max_bytes"),
    (req("cancel", ids=[UNKNOWN_ID], reason=1), "reason"),
    (req("shutdown", drain="yes"), "drain"),
    (req("shutdown", drain=1), "drain"),
    (req("hello", client=1), "client"),
    (req("hello", client=b"bin"), "client"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_values_for_other_ops(rq: RawReq, msg: dict[str, Any], field: str) -> None:
    msg = {**msg, "rid": "o"}
    assert_error(rq.call(msg), "bad_request", field, rid="o")


def test_valid_requests_about_unknown_ids(rq: RawReq) -> None:
    for op, fields in (("status", {"ids": [UNKNOWN_ID]}), ("result", {"id": UNKNOWN_ID}),
                       ("wait", {"ids": [UNKNOWN_ID], "timeout": 0}), ("cancel", {"ids": [UNKNOWN_ID]}),
                       ("read_output", {"id": UNKNOWN_ID, "stream": "stderr"})):
        assert_error(rq.call(req(op, rid=op, **fields)), "not_found", UNKNOWN_ID, rid=op)
    reply = rq.call(req("list", rid="l", limit=10_000, states=None, labels=None))  # nil = absent
    assert reply["ok"] is True and reply["rid"] == "l"


# ---- nesting and ext types ------------------------------------------------------------------


def test_deep_nesting_refused(rq: RawReq) -> None:
    for depth in (2_000, 100_000):
        reply = rq.raw(b"\x91" * depth + b"\xc0")  # [[[[...nil...]]]]
        assert reply is not None
        assert_error(reply, "bad_request", "nesting", rid=None)
    nested_map = b"\x81\xa1a" * 5_000 + b"\xc0"  # {"a": {"a": ...}}
    reply = rq.raw(nested_map)
    assert reply is not None
    assert_error(reply, "bad_request", "nesting", rid=None)


def nested_submit(depth: int) -> bytes:
    """submit of a python effect whose single argument is a list nested ``depth`` deep, encoded
    by hand (msgpack's packer refuses to build it)."""
    head = pack({"v": 1, "rid": "deep", "op": "submit"})
    head = bytes([head[0] + 1]) + head[1:]  # one more fixmap entry: "effect"
    eff = pack({"kind": "python", "target": "effectd_test_effects:echo", "cwd": "/"})
    eff = bytes([eff[0] + 1]) + eff[1:]  # one more entry: "args"
    return head + pack("effect") + eff + pack("args") + b"\x91" * depth + b"\xc0"


@pytest.mark.slow
def test_deeply_nested_arguments_do_not_crash_the_daemon(daemon: DaemonHandle) -> None:
    d = daemon
    sock = RawReq(Endpoints.for_runtime(d.runtime).control)
    try:
        depth = None  # the deepest submit the daemon accepts (a fixed daemon may refuse all)
        for n in range(1030, 990, -1):
            reply = sock.raw(nested_submit(n))
            assert reply is not None, f"no reply to a submit nested {n} deep"
            if reply.get("ok"):
                depth = n
                break
        if depth is not None:
            status = sock.raw(pack(req("status", rid="s", ids=[reply["id"]])), timeout_ms=2000)
            assert status is not None, f"no reply to status (depth {depth}): the daemon died"
            assert status["rid"] == "s"  # ok, or a clean error
        hello = sock.call(req("hello", rid="h"))
        assert hello["ok"] is True and hello["pid"] == d.pid
    finally:
        sock.close()
        if not _answers(d):  # a crashed daemon does not stop its workers
            for p in d.worker_processes():
                p.kill()


def _answers(d: DaemonHandle) -> bool:
    try:
        with Client(d.runtime, state=d.state, autostart=False, timeout=0.5, retries=0) as c:
            c.hello()
        return True
    except Exception:
        return False


def test_ext_types_refused(rq: RawReq) -> None:
    for ext in (msgpack.ExtType(5, b"x"), msgpack.ExtType(0, b"\x00" * 4), msgpack.ExtType(127, b"")):
        assert_error(rq.call(req("hello", rid="x", client=ext)), "bad_request", rid=None)
    ts = msgpack.packb({"v": 1, "rid": "t", "op": "hello", "client": msgpack.Timestamp(1, 0)})
    reply = rq.raw(ts)
    assert reply is not None
    assert_error(reply, "bad_request", rid=None)
    effect = {**PYTHON, "args": [msgpack.ExtType(1, b"payload")]}
    assert_error(rq.call(req("submit", rid="x", effect=effect)), "bad_request", rid=None)


def test_decoder_size_limits(rq: RawReq) -> None:
    assert_error(rq.call(req("hello", client="x" * (8 * MIB + 1))), "bad_request", rid=None)
    assert_error(rq.call(req("status", ids=[UNKNOWN_ID] * 100_001)), "bad_request", rid=None)
    big_map = {f"k{i}": 0 for i in range(100_001)}
    assert_error(rq.call(req("list", labels=big_map)), "bad_request", rid=None)


# ---- DEALER framing -------------------------------------------------------------------------


def test_dealer_framing(dealer: RawDealer) -> None:
    hello = pack(req("hello", rid="d1"))
    ok = dealer.call([b"", hello])  # what REQ does on the wire
    assert ok["ok"] is True and ok["rid"] == "d1"
    ok = dealer.call([hello])  # the delimiter may be omitted
    assert ok["ok"] is True and ok["rid"] == "d1"
    assert_error(dealer.call([b"", hello, hello]), "bad_request", "exactly one", "2", rid=None)
    assert_error(dealer.call([b"", b"", hello]), "bad_request", "exactly one", rid=None)
    assert_error(dealer.call([hello, hello, hello]), "bad_request", "exactly one", rid=None)
    assert_error(dealer.call([b"", b"garbage", b""]), "bad_request", rid=None)
    assert_error(dealer.call([b"", b""]), "bad_request", rid=None)  # empty body
    assert_error(dealer.call([b""]), "bad_request", "exactly one", "0", rid=None)
    assert_error(dealer.call([b"\xc1"]), "bad_request", rid=None)
    assert_error(dealer.call([b"", b"", b"", b"", b""]), "bad_request", rid=None)


def test_dealer_pipelined_garbage_then_hello(dealer: RawDealer) -> None:
    """200 bad messages back to back, then a hello: every one is answered, in order."""
    frames: list[list[bytes]] = []
    for i in range(200):
        body = [b"\xc1", pack([i]), pack({"v": 1, "rid": i}), pack(req("nope", rid=i))][i % 4]
        frames.append([b"", body] if i % 2 else [b"", body, b"extra"])
    for f in frames:
        dealer.send(f)
    dealer.send([b"", pack(req("hello", rid="after"))])
    replies = [dealer.recv() for _ in range(201)]
    assert all(r is not None for r in replies)
    assert [r["ok"] for r in replies] == [False] * 200 + [True]  # type: ignore[index]
    assert replies[-1]["rid"] == "after"  # type: ignore[index]


def test_oversized_frames(endpoint: str, dealer: RawDealer) -> None:
    # Exactly at the 16 MiB limit: delivered, and refused by the decoder as garbage.
    dealer.send([b"", b"\xc1" * (16 * MIB)])
    at_limit = dealer.recv(timeout_ms=20_000)
    assert at_limit is not None
    assert_error(at_limit, "bad_request", rid=None)
    # One byte over: too_large (or, per the older docs, a dropped connection) - never served.
    dealer.send([b"", pack(req("hello", rid="x" * 100, client="c" * (16 * MIB)))])
    over = dealer.recv(timeout_ms=20_000)
    if over is not None:
        assert_error(over, "too_large", rid=None)
    assert dealer.call([b"", pack(req("hello", rid="d"))])["rid"] == "d"


@pytest.mark.slow
def test_huge_frame_drops_only_that_peer(endpoint: str) -> None:
    """Far over the limit (> 32 MiB, the socket's ZMQ_MAXMSGSIZE) libzmq disconnects the
    sender before buffering it; nobody else notices."""
    big = RawDealer(endpoint)
    waiting = RawReq(endpoint)
    try:
        big.send([b"", b"\x00" * (40 * MIB)])
        for i in range(3):
            reply = waiting.call(req("hello", rid=f"other-{i}"))
            assert reply["ok"] is True and reply["rid"] == f"other-{i}"
        assert big.recv(timeout_ms=300) is None
    finally:
        big.close()
    lone = RawReq(endpoint)  # a REQ client sending one just times out
    try:
        assert lone.raw(b"\x00" * (40 * MIB), timeout_ms=800) is None
        assert lone.call(req("hello", rid="again"))["rid"] == "again"  # a fresh socket works
    finally:
        lone.close()
        reply = waiting.call(req("hello", rid="still"))
        assert reply["ok"] is True and reply["rid"] == "still"
        waiting.close()


# ---- fuzz -----------------------------------------------------------------------------------

FIELD_NAMES = sorted({"v", "rid", "op", "effect", "effects", "request_key", "ids", "id", "states",
                      "labels", "name", "limit", "before", "timeout", "return_when", "reason",
                      "stream", "offset", "max_bytes", "client", "kind", "seconds", "target",
                      "args", "kwargs", "argv", "command", "cwd", "env"})
FUZZ_OPS = ["hello", "submit", "submit_many", "status", "list", "wait", "result", "cancel",
            "read_output", "groups", "nope"]  # never shutdown, gc or group_set: state-changing

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats() | st.text(max_size=24) | st.binary(max_size=24)
           | st.sampled_from(["sleep", "python", UNKNOWN_ID, "stdout", "all", "first"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELD_NAMES), inner,
                                        max_size=4), max_leaves=16)
random_maps = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), values, max_size=8)
envelopes = st.builds(
    lambda v, op, rid, rest: {**rest, "v": v, "op": op, "rid": rid},
    st.sampled_from([1, 1, 1, 0, 2, -1, "1", None]),
    st.sampled_from(FUZZ_OPS),
    st.none() | st.text(max_size=10) | st.integers(min_value=-(2**63), max_value=2**64 - 1),
    random_maps)
messages = st.one_of(st.binary(max_size=512), random_maps.map(pack), envelopes.map(pack),
                     values.map(pack))


@pytest.fixture(scope="module")
def fuzz_sock(shared: DaemonHandle) -> Iterator[RawReq]:
    sock = RawReq(Endpoints.for_runtime(shared.runtime).control)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def rss_before(shared: DaemonHandle, fuzz_sock: RawReq) -> int:
    for i in range(50):  # warm up allocator and caches first
        fuzz_sock.call(req("hello", rid=i))
        fuzz_sock.raw(b"\xc1")
    return int(psutil.Process(shared.pid).memory_info().rss)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=messages)
def test_fuzz_every_message_gets_a_reply(fuzz_sock: RawReq, rss_before: int, data: bytes) -> None:
    reply = fuzz_sock.raw(data)
    assert reply is not None, f"no reply to {data[:100]!r}"
    assert reply.get("v") == 1
    if reply.get("ok") is not True:
        assert reply.get("ok") is False
        err = reply.get("error")
        assert isinstance(err, dict) and isinstance(err.get("code"), str), reply
        assert err["code"] != "internal", reply  # hostile input is never an internal error


def test_after_fuzz_daemon_answers_and_memory_is_bounded(shared: DaemonHandle, fuzz_sock: RawReq,
                                                         rss_before: int) -> None:
    hello = fuzz_sock.call(req("hello", rid="post-fuzz"))
    assert hello["ok"] is True and hello["pid"] == shared.pid
    rss_after = int(psutil.Process(shared.pid).memory_info().rss)
    assert rss_after - rss_before < 50 * MIB, (rss_before, rss_after)
