"""The client core without sockets: its operations are generators of steps, so a scripted fake
daemon can drive them through drops, duplicates, a lost 'finished' event, hostile frames and
busy answers in milliseconds (the real-daemon versions are in test_streaming.py/test_aio.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from effectd.client import core
from effectd.client.follow import Follower, follow
from effectd.client.transport import check_reply
from effectd.ipc import codec, records
from effectd.ipc.errors import Busy, EffectdError, InvalidState

DATA = bytes(range(48, 48 + 64))
READ_SIZE = 5
"""The fake answers reads with at most this many bytes, so every fill takes several reads."""


def frame(offset: int, data: bytes, stream: str = "stdout") -> list[bytes]:
    return [b"topic", codec.pack({"stream": stream, "offset": offset}), data]


FINISHED_FRAME = [b"topic", codec.pack({"stream": "event", "event": "finished"}), b""]


@dataclass
class FakeDaemon:
    """Answers the core's steps: ``visible`` bytes of DATA are stored; each received live frame
    makes its bytes visible; the effect is final once ``final`` is set."""

    live: list[tuple[list[bytes], bool]]
    """(frame, whether the effect is final once it is received)."""
    visible: int = 0
    final: bool = False
    busy: int = 0
    """How many read_output calls are answered ``busy`` first."""
    steps: list[Any] = field(default_factory=list)

    def answer(self, step: core.Step) -> Any:
        self.steps.append(step)
        if isinstance(step, core.Poll):
            return bool(self.live)
        if isinstance(step, core.Recv):
            frames, final = self.live.pop(0)
            try:
                header = codec.unpack(frames[1]) if len(frames) == 3 else None
            except EffectdError:
                header = None
            if isinstance(header, dict) and isinstance(header.get("offset"), int):
                self.visible = max(self.visible, header["offset"] + len(frames[2]))
            self.final = self.final or final
            return frames
        if isinstance(step, core.Sleep):
            return None
        assert isinstance(step, core.Call)
        if step.op == "status":
            return {"ok": True, "effects": [{"id": "e", "state": "succeeded" if self.final else "running"}]}
        assert step.op == "read_output"
        if self.busy:
            self.busy -= 1
            raise Busy("read budget in use")
        a = step.args
        end = min(self.visible, a["offset"] + min(a["max_bytes"] or READ_SIZE, READ_SIZE))
        data = DATA[a["offset"]:end]
        return {"ok": True, "id": "e", "stream": a["stream"], "offset": a["offset"], "data": data,
                "next_offset": a["offset"] + len(data), "size": self.visible if a["stream"] == "stdout" else 0,
                "state": "succeeded" if self.final else "running", "final": self.final,
                "eof": self.final and end == self.visible}


def drive(ops: core.Ops[Any], fake: FakeDaemon, max_steps: int = 10_000) -> Iterator[Any]:
    """The smallest driver: what Client and AsyncClient do with sockets."""
    m = core.Machine(ops)
    try:
        while (step := m.next()) is not None:
            assert len(fake.steps) < max_steps, "the operation does not end"
            if isinstance(step, core.Emit):
                yield step.item
                continue
            with m.outcome():
                m.give(fake.answer(step))
    finally:
        m.close()


def stream(fake: FakeDaemon, from_offset: int = 0) -> tuple[bytes, Follower]:
    f = Follower.start(("stdout",), from_offset)
    chunks = list(drive(follow("e", f), fake))
    offsets = [c.offset for c in chunks]
    assert offsets == sorted(offsets), "chunks out of order"
    return b"".join(c.data for c in chunks), f


def test_drops_and_duplicates_are_repaired_exactly() -> None:
    # 8-byte pieces: some never arrive (gaps), some arrive twice or overlapping (duplicates),
    # and the last one carries the end of the effect.
    pieces = [(o, DATA[o:o + 8]) for o in range(0, 64, 8)]
    live = [pieces[0], pieces[2], pieces[2], (12, DATA[12:20]), pieces[3], pieces[6], pieces[1], pieces[7]]
    fake = FakeDaemon([(frame(o, d), i == len(live) - 1) for i, (o, d) in enumerate(live)], visible=3)
    fake.live.append((FINISHED_FRAME, True))
    data, f = stream(fake)
    assert data == DATA
    assert f.gaps_filled >= 2 and f.duplicates >= 2


def test_a_lost_finished_event_still_ends_the_stream() -> None:
    fake = FakeDaemon([(frame(0, DATA[:30]), False), (frame(30, DATA[30:]), True)])
    assert stream(fake)[0] == DATA  # no 'finished' frame: the idle check finds the final state


def test_hostile_frames_are_ignored() -> None:
    hostile: list[list[bytes]] = [
        [b"topic"], [b"a", b"b", b"c", b"d"], [b"topic", b"\xc1not msgpack", b"x"],
        [b"topic", codec.pack([1, 2]), b"x"], [b"topic", codec.pack({"stream": "stdout", "offset": -5}), b"x"],
        [b"topic", codec.pack({"stream": "stdout", "offset": True}), b"x"],
        [b"topic", codec.pack({"stream": "nope", "offset": 0}), b"x"],
        [b"topic", codec.pack({"stream": "event", "event": "subscribed"}), b""],
    ]
    fake = FakeDaemon([(h, False) for h in hostile] + [(frame(0, DATA), True), (FINISHED_FRAME, True)])
    assert stream(fake)[0] == DATA


def test_from_offset_and_a_final_effect_replay_from_the_store_once() -> None:
    fake = FakeDaemon([], visible=len(DATA), final=True)
    assert stream(fake, from_offset=10)[0] == DATA[10:]
    assert not any(isinstance(s, core.Recv) for s in fake.steps)


def test_busy_reads_back_off_then_succeed_or_give_up() -> None:
    fake = FakeDaemon([], visible=4, final=True, busy=3)
    piece = list(drive(core.read_output("e", "stdout", 0, None), fake))
    assert piece == [] and sum(isinstance(s, core.Sleep) for s in fake.steps) == 3
    fake = FakeDaemon([], visible=4, final=True, busy=10**9)
    with pytest.raises(Busy):
        list(drive(core.read_output("e", "stdout", 0, None), fake))
    sleeps = [s.seconds for s in fake.steps if isinstance(s, core.Sleep)]
    assert core.BUSY_GIVE_UP - 0.25 <= sum(sleeps) <= core.BUSY_GIVE_UP + 0.25 and max(sleeps) <= 0.25


def test_error_replies_map_to_their_exceptions_and_malformed_ones_do_not_crash() -> None:
    assert check_reply({"ok": True, "x": 1}) == {"ok": True, "x": 1}
    with pytest.raises(InvalidState, match="still running"):
        check_reply({"ok": False, "error": {"code": "invalid_state", "message": "still running"}})
    for bad in ({"ok": False, "error": "boom"}, {"ok": False}, [1], None):
        with pytest.raises(EffectdError):
            check_reply(bad)


def test_return_when_is_checked_before_anything_is_sent() -> None:
    fake = FakeDaemon([])
    with pytest.raises(ValueError, match="return_when"):
        list(drive(core.wait_many(["e"], 1.0, "any"), fake))
    assert fake.steps == []


def test_protocol_logic_lives_only_in_the_core() -> None:
    # The drivers perform steps; decoding replies into records, error mapping, gap filling and
    # frame parsing must not creep back into them (that is how the two clients drifted apart).
    import ast
    from pathlib import Path

    import effectd.client

    core_only = {"from_wire", "error_from_wire", "accept", "stored", "read_window", "apply_read", "finished",
                 "parse_frame", "busy_backoff", "WAIT_SLICE"}
    for name in ("sync.py", "aio.py"):
        tree = ast.parse((Path(effectd.client.__file__).parent / name).read_text())
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not used & core_only, f"{name} uses {sorted(used & core_only)}"


def test_replies_are_decoded_into_their_declared_types() -> None:
    """The client reads each reply through the op's declaration in ipc/records.py (the one the
    daemon encodes with): a reply that does not match it is a protocol error, not a KeyError."""
    reply = core.checked("submit", {"ok": True, "v": 1, "rid": "1", "id": "E", "state": "queued"})
    assert isinstance(reply, records.SubmitReply) and reply.id == "E"
    waited = core.checked("wait", {"ok": True, "effects": [{"id": "E", "state": "queued"}], "done": [],
                                   "timed_out": True})
    assert isinstance(waited, records.WaitReply) and waited.timed_out and waited.effects == [{"id": "E",
                                                                                           "state": "queued"}]
    for op, bad in (("submit", {"ok": True, "ids": ["E"]}), ("wait", {"ok": True, "effects": "E", "done": [],
                                                                     "timed_out": False}),
                    ("read_output", {"ok": True, "id": "E", "data": "not bytes"})):
        with pytest.raises(EffectdError, match="does not match the protocol"):
            core.checked(op, bad)
