"""The typed messages of effectd/ipc keep the wire as it was, and refuse what they must.

* Records, replies and stream headers encode to exactly the bytes of the dict-built messages
  they replace (same keys, same order, same values): the Node client and protocol.md stay valid.
* The client decodes the daemon's record into the same declared class, losing nothing.
* Worker messages: typed decode refuses wrong types, limits, ext types and unknown types with
  the protocol's errors, and nothing else escapes on hostile bytes.
* ``hello`` reports each worker's real rss (it was always 0).
* The typed check of an effect spec accepts exactly what the field tables accept.
* Requests: every op's arguments struct has exactly its Field table's fields (order, types,
  required-ness, defaults), every handler takes its op's struct, parse_request returns it, and
  the client's requests built from the structs are the same maps (so bytes) as before.
"""

from __future__ import annotations

import contextlib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effectd.client import core
from effectd.daemon.core import Effect
from effectd.daemon.requests import RequestHandlers
from effectd.ipc import codec, messages, records, schema
from effectd.ipc import request_args as ra
from effectd.ipc.errors import BadRequest, EffectdError, TooLarge, UnknownOp
from effectd.ipc.schema import EFFECT_FIELDS, EffectState, check_fields
from tests.conftest import wait_until

EID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

# The record's keys in the order Effect.to_record wrote them before the record was declared.
RECORD_KEYS = ["id", "kind", "name", "labels", "state", "reason", "attempt", "attempts", "submitted_at",
               "started_at", "finished_at", "worker", "pid", "create_time", "exit_code", "signal", "result",
               "error", "sizes", "truncated", "leaked_processes", "progress", "not_before", "cancel_requested",
               "spec"]


def _failed_effect() -> Effect:
    eff = Effect(id=EID, spec={"kind": "python", "target": "m:f", "name": "n", "labels": {"a": "b"}},
                 submitted_at=1.5, state=EffectState.FAILED, attempt=2, reason="exception", worker="w-1",
                 pid=42, create_time=3.25, started_at=2.0, finished_at=4.0, result=[1, b"x", {"k": None}],
                 error={"type": "ValueError", "message": "bad", "traceback": "tb"},
                 sizes={"stdout": 3, "stderr": 0, "value": 0}, attempts=[{"attempt": 1, "state": "failed"}],
                 progress={"fraction": 0.5, "message": "half", "time": 3.0}, not_before=0.0)
    return eff


def test_record_keeps_its_keys_values_and_bytes() -> None:
    eff = _failed_effect()
    rec = eff.to_record()
    assert list(rec) == RECORD_KEYS
    assert rec["state"] == "failed" and rec["error"] == {"type": "ValueError", "message": "bad", "traceback": "tb"}
    assert rec["spec"] is eff.spec  # shallow: the spec is not copied on every journaled change
    old = {k: getattr(eff, k, None) for k in RECORD_KEYS}
    old.update(kind="python", name="n", labels={"a": "b"}, state="failed")
    assert codec.pack(rec) == codec.pack(old)


def test_client_decodes_the_daemons_record_into_the_same_class() -> None:
    rec = codec.unpack(codec.pack(_failed_effect().to_record()))
    got = records.EffectRecord.from_wire(rec)
    assert got.state is EffectState.FAILED and got.final and not got.succeeded
    assert got.error == records.EffectError(type="ValueError", message="bad", traceback="tb")
    assert got.result == [1, b"x", {"k": None}] and got.duration == 2.0
    assert records.record_map(got) == rec  # nothing lost on the way
    assert set(got.to_json()) == set(RECORD_KEYS) - {"worker", "create_time", "not_before", "cancel_requested"}


def test_replies_encode_like_the_dict_replies() -> None:
    rec = _failed_effect().to_record()
    item = codec.pack(rec)
    reply = records.WaitReply(effects=[records.PackedRecord(item)], done=[EID], timed_out=False)
    reply.rid = "r-1"
    assert records.encode_reply(reply) == codec.pack(
        {"v": 1, "rid": "r-1", "ok": True, "effects": [rec], "done": [EID], "timed_out": False})
    read = records.ReadOutputReply(id=EID, stream="stdout", offset=0, data=b"\xff\x00", next_offset=2, size=2,
                                   state="running", final=False, eof=False)
    assert msgpack.unpackb(records.encode_reply(read))["data"] == b"\xff\x00"  # bin stays bin
    assert records.error_reply(None, "bad_request", "effect.timeout: must be >= 0.001") == codec.pack(
        {"v": 1, "rid": None, "ok": False,
         "error": {"code": "bad_request", "message": "effect.timeout: must be >= 0.001"}})


def test_stream_headers_encode_like_the_dict_headers() -> None:
    assert messages.encode(messages.ChunkHeader(stream="stdout", offset=7, attempt=2)) == codec.pack(
        {"stream": "stdout", "offset": 7, "attempt": 2})
    assert messages.encode(messages.EventHeader(event="subscribed", state=None)) == codec.pack(
        {"stream": "event", "event": "subscribed"})
    started = messages.EventHeader(event="started", state="running", attempt=1, time=1.5)
    assert messages.encode(started) == codec.pack(
        {"stream": "event", "event": "started", "state": "running", "attempt": 1, "time": 1.5})


def test_worker_messages_round_trip_and_refuse_bad_values() -> None:
    fin = messages.Finished(id=EID, attempt=1, state="succeeded", exit_code=0, sizes={"stdout": 1})
    assert messages.decode_worker_message(messages.encode(fin)) == fin
    assert messages.decode_daemon_message(messages.encode(messages.Ack(id=EID, attempt=1))) == \
        messages.Ack(id=EID, attempt=1)
    bad = [
        ({"t": "finished", "id": EID, "attempt": 0, "state": "succeeded"}, BadRequest),
        ({"t": "finished", "id": "nope", "attempt": 1, "state": "succeeded"}, BadRequest),
        ({"t": "finished", "id": EID, "attempt": 1, "state": "running"}, BadRequest),
        ({"t": "progress", "id": EID, "attempt": 1, "message": "x" * 4097}, BadRequest),
        ({"t": "nope"}, UnknownOp),
        ({"id": EID}, BadRequest),
        ([1, 2], BadRequest),
    ]
    for msg, error in bad:
        with pytest.raises(error):
            messages.decode_worker_message(codec.pack(msg))
    with pytest.raises(BadRequest, match="ext type"):
        messages.decode_worker_message(codec.pack({"t": "finished", "id": EID, "attempt": 1, "state": "failed",
                                                   "result": msgpack.ExtType(5, b"x")}))
    with pytest.raises(TooLarge):
        messages.decode_worker_message(b"\x80" * 11, max_bytes=10)
    report = {"id": EID, "attempt": 1, "state": "lost", "reason": "exit_status_unknown"}
    assert messages.check_report(report, messages.Finished).state == "lost"


WIRE_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256) | st.builds(codec.pack, st.dictionaries(
    st.sampled_from(["t", "id", "attempt", "state", "pid", "running", "finished", "spec"]),
    st.one_of(st.none(), WIRE_INTS, st.text(max_size=30), st.sampled_from(["ready", "hb", "finished", EID]),
              st.lists(WIRE_INTS, max_size=3)), max_size=6)))
def test_hostile_worker_bytes_only_raise_protocol_errors(data: bytes) -> None:
    for decode in (messages.decode_worker_message, messages.decode_daemon_message):
        with contextlib.suppress(EffectdError):
            decode(data)


def test_hello_reports_each_workers_real_rss(daemon: Any) -> None:
    with daemon.client() as c:
        workers = wait_until(lambda: [w for w in c.hello()["workers"] if w["rss"] > 0], timeout=15,
                             what="a worker's rss in hello")
    assert all(1024 * 1024 < w["rss"] < 4 * 1024**3 for w in workers), workers
    assert isinstance(msgspec.convert(workers[0], records.WorkerInfo), records.WorkerInfo)


# The typed pass over an effect spec (schema.EffectSpec, generated from EFFECT_FIELDS) must accept
# exactly what check_fields accepts, with the same values; what it refuses goes to check_fields
# for the precise message.
VALUES = st.one_of(
    st.none(), st.booleans(), WIRE_INTS, st.integers(min_value=-3, max_value=3), st.floats(allow_nan=True),
    st.sampled_from([0.001, 0.0005, 1e-9, 3600, 3600.5, 10 * 365 * 86400 + 1, 1 << 40, 1024]),
    st.text(max_size=8), st.sampled_from(["shell", "python", "sleep", "m:f", EID, EID.lower(), "a\0b", "x" * 300]),
    st.lists(st.one_of(st.text(max_size=4), st.sampled_from([EID, "a\0"]), st.integers()), max_size=3),
    st.lists(st.sampled_from([EID]), min_size=0, max_size=2).map(tuple),
    st.dictionaries(st.sampled_from(["as", "cpu", "k", "", "x" * 1025]),
                    st.one_of(st.text(max_size=4), st.integers(min_value=-5, max_value=5), st.booleans()),
                    max_size=3),
)


SHORT = st.text(max_size=4)
VALID = {
    "argv": st.lists(SHORT, min_size=1, max_size=3), "command": SHORT, "cwd": SHORT,
    "env": st.dictionaries(SHORT, SHORT, max_size=2), "target": st.just("m:f"), "args": st.lists(WIRE_INTS, max_size=2),
    "kwargs": st.dictionaries(SHORT, WIRE_INTS, max_size=2), "seconds": st.integers(0, 9) | st.floats(0, 9),
    "name": SHORT, "labels": st.dictionaries(SHORT, SHORT, max_size=2),
    "timeout": st.integers(1, 9) | st.floats(0.001, 9), "retries": st.integers(0, 100),
    "retry_backoff": st.integers(0, 3600) | st.floats(0, 3600), "priority": st.integers(-9, 9), "group": SHORT,
    "after": st.lists(st.just(EID), max_size=2), "after_any_outcome": st.booleans(), "stdin_from": st.just(EID),
    "max_output_bytes": st.integers(1024, 1 << 40),
    "rlimits": st.dictionaries(st.sampled_from(["as", "cpu", "nofile"]), st.integers(0, 9), max_size=2),
}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["shell", "python", "sleep", None, 1]),
       st.fixed_dictionaries({}, optional={**{name: VALID[name] | VALUES for name in VALID}, "bogus": VALUES}))
def test_typed_spec_check_accepts_exactly_what_the_field_tables_accept(kind: Any, fields: dict[str, Any]) -> None:
    spec = {"kind": kind, **fields}
    try:
        expected: dict[str, Any] | None = check_fields(EFFECT_FIELDS, spec)
    except BadRequest:
        expected = None
    typed = schema._typed_effect_fields(spec)
    if typed is not None:
        assert expected is not None, f"typed accepted what the field tables refuse: {spec!r}"
        assert typed == expected
        assert [type(v) for v in typed.values()] == [type(v) for v in expected.values()]


def test_typed_spec_check_keeps_the_precise_messages() -> None:
    for spec, message in [({"kind": "shell", "argv": ["a"], "timeout": 0}, "effect.timeout: must be >= 0.001"),
                          ({"kind": "shell", "argv": ("a",)}, "effect.argv: expected an array, got tuple"),
                          ({"kind": "sleep", "seconds": float("nan")}, "effect.seconds: must be a finite number"),
                          ({"kind": "shell", "argv": ["a"], "bogus": 1}, "effect.bogus: unknown field")]:
        with pytest.raises(BadRequest) as info:
            schema.check_effect_spec(spec)
        assert info.value.message == message


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["shell", "python", "sleep"]), st.fixed_dictionaries({}, optional=VALID))
def test_typed_spec_check_takes_valid_specs_in_its_one_pass(kind: str, fields: dict[str, Any]) -> None:
    spec = {"kind": kind, **fields}
    typed = schema._typed_effect_fields(spec)
    assert typed is not None and typed == check_fields(EFFECT_FIELDS, spec)


# ---- requests: the arguments structs (ipc/request_args.py) and the Field tables (schema.OPS)

SCALARS: dict[str | None, Any] = {"str": str, "id": str, "int": int, "num": float, "bool": bool, "any": Any,
                                  None: Any, "map": dict[str, Any]}


def _annotation(f: schema.Field) -> Any:
    """The type a field's values have once checked (choices may also be declared as a Literal)."""
    if f.type == "list":
        kind: Any = types.GenericAlias(list, (SCALARS[f.items],))
    elif f.type == "map":
        kind = types.GenericAlias(dict, (str, SCALARS[f.items]))
    else:
        kind = SCALARS[f.type]
    return kind if f.required or f.default is not None else kind | None


@pytest.mark.parametrize("op", list(schema.OPS))
def test_every_ops_arguments_struct_has_exactly_its_field_table(op: str) -> None:
    spec = schema.OPS[op]
    cls = spec.args
    assert schema.OP_OF_ARGS[cls] == op
    assert cls.__struct_fields__ == tuple(f.name for f in spec.fields)  # declared order = wire order
    hints = typing.get_type_hints(cls)
    defaults = dict(zip(cls.__struct_fields__[len(cls.__struct_fields__) - len(cls.__struct_defaults__):],
                        cls.__struct_defaults__, strict=True))
    for f in spec.fields:
        expected = _annotation(f)
        allowed = {expected}
        if f.choices is not None:
            allowed.add(Literal[f.choices])
        assert hints[f.name] in allowed, f"{op}.{f.name}: declared {hints[f.name]}, the table says {expected}"
        if f.required:
            assert f.name not in defaults or defaults[f.name] is msgspec.NODEFAULT, f"{op}.{f.name} is required"
        else:
            assert defaults.get(f.name, msgspec.NODEFAULT) == f.default, f"{op}.{f.name}: default"


@pytest.mark.parametrize("op", list(schema.OPS))
def test_every_handler_takes_its_ops_arguments_struct(op: str) -> None:
    hints = typing.get_type_hints(getattr(RequestHandlers, f"op_{op}"))
    assert typing.get_args(hints["req"]) == (schema.OPS[op].args,)


def test_parse_request_returns_the_ops_struct_with_defaults_filled() -> None:
    base = {"v": 1, "rid": 7}
    req = schema.parse_request({**base, "op": "wait", "ids": [EID]})
    assert req == ra.Request(op="wait", id=7, version=1, args=ra.WaitArgs(ids=[EID], timeout=30.0, return_when="all"))
    req2 = schema.parse_request({**base, "op": "read_output", "id": EID, "stream": "stdout"})
    assert req2.args == ra.ReadOutputArgs(id=EID, stream="stdout", offset=0, max_bytes=ra.DEFAULT_READ_BYTES)
    spec = {"kind": "sleep", "seconds": 1}
    req3 = schema.parse_request({**base, "op": "submit", "effect": spec})
    assert req3.args == ra.SubmitArgs(effect=schema.check_effect_spec(spec), request_key=None)
    assert schema.parse_request({**base, "op": "groups"}).args == ra.GroupsArgs()


def _first_call(ops: core.Ops[Any]) -> core.Call:
    step = next(ops)
    assert isinstance(step, core.Call)
    return step


# The maps the client core built by hand before the structs (effectd/client/core.py at dbd3f8f).
CLIENT_REQUESTS: list[tuple[Callable[[], core.Ops[Any]], str, dict[str, Any]]] = [
    (lambda: core.hello("c/1"), "hello", {"client": "c/1"}),
    (lambda: core.submit({"kind": "sleep", "seconds": 1}, "k"), "submit",
     {"effect": {"kind": "sleep", "seconds": 1}, "request_key": "k"}),
    (lambda: core.submit_many([{"kind": "sleep", "seconds": 1}], "k"), "submit_many",
     {"effects": [{"kind": "sleep", "seconds": 1}], "request_key": "k"}),
    (lambda: core.status_many([EID, EID]), "status", {"ids": [EID, EID]}),
    (lambda: core.list_effects(None, None, None, 100, None), "list",
     {"states": None, "labels": None, "name": None, "limit": 100, "before": None}),
    (lambda: core.list_effects(["queued"], {"a": "b"}, "n", 5, EID), "list",
     {"states": ["queued"], "labels": {"a": "b"}, "name": "n", "limit": 5, "before": EID}),
    (lambda: core.wait([EID], None, True), "wait", {"ids": [EID], "timeout": core.WAIT_SLICE, "return_when": "first"}),
    (lambda: core.result(EID), "result", {"id": EID}),
    (lambda: core.cancel([EID], None), "cancel", {"ids": [EID], "reason": None}),
    (lambda: core.cancel([EID], "why"), "cancel", {"ids": [EID], "reason": "why"}),
    (lambda: core.read_output(EID, "stdout", 5, None), "read_output",
     {"id": EID, "stream": "stdout", "offset": 5, "max_bytes": None}),
    (lambda: core.read_output(EID, "value", 0, 10), "read_output",
     {"id": EID, "stream": "value", "offset": 0, "max_bytes": 10}),
    (lambda: core.set_group_limit("g", None), "group_set", {"name": "g", "parallel": None}),
    (lambda: core.groups(), "groups", {}),
    (lambda: core.gc(1.5, None, 10), "gc", {"retain_days": 1.5, "retain_count": None, "retain_bytes": 10}),
    (lambda: core.shutdown(False), "shutdown", {"drain": False}),
]


@pytest.mark.parametrize(("make", "op", "old"), CLIENT_REQUESTS,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CLIENT_REQUESTS)])
def test_client_requests_built_from_the_structs_are_the_same_bytes(
        make: Callable[[], core.Ops[Any]], op: str, old: dict[str, Any]) -> None:
    call = _first_call(make())
    assert call.op == op
    assert list(call.args.items()) == list(old.items())
    new_bytes = codec.pack(schema.build_request(call.op, 3, **call.args))
    assert new_bytes == codec.pack(schema.build_request(op, 3, **old))
