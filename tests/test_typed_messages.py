"""The typed messages of effectd/ipc keep the wire as it was, and refuse what they must.

* Records, replies and stream headers encode to exactly the bytes of the dict-built messages
  they replace (same keys, same order, same values): the Node client and protocol.md stay valid.
* The client decodes the daemon's record into the same declared class, losing nothing.
* Worker messages: typed decode refuses wrong types, limits, ext types and unknown types with
  the protocol's errors, and nothing else escapes on hostile bytes.
* ``hello`` reports each worker's real rss (it was always 0).
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effectd.daemon.core import Effect
from effectd.ipc import codec, messages, records
from effectd.ipc.errors import BadRequest, EffectdError, TooLarge, UnknownOp
from effectd.ipc.schema import EffectState
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
    assert messages.check_finish(report)["state"] == "lost"


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
