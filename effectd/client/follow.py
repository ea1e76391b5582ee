"""Exact streams from a lossy PUB: the one stream/gap-fill algorithm of both clients.

The follower subscribes first, then reads what is stored (``read_output``), then applies live
chunks: a chunk entirely before the expected offset is a duplicate and is dropped; one that
starts after it reveals a gap, which is filled from the store before the chunk is used. The
stream ends when the effect is final and every stream has been read to its final size. This is
the zguide's Clone pattern with the output files as the snapshot (see docs/protocol.md §9).
:class:`Follower` keeps the offsets; :func:`follow` is the loop, written as a core operation
(see ``core.py``) that the sync and the async client drive with their own sockets.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from effectd.client.core import Emit, Ops, Poll, Recv, read_output, status
from effectd.client.records import Chunk, OutputSlice
from effectd.ipc.messages import EventHeader, decode_stream_header
from effectd.ipc.schema import MAX_READ_BYTES, OUTPUT_STREAMS

FINISHED: Literal["finished"] = "finished"
SUBSCRIBED_WAIT = 2.0
"""Seconds to wait for the daemon's 'subscribed' event before reading the store anyway."""
IDLE_CHECK = 0.25
"""A follower in which no stream advanced for this long checks the store (covers a dropped
'finished' event, even while unrelated messages keep arriving)."""


def parse_frame(frames: list[bytes]) -> Chunk | Literal["finished"] | None:
    """Decode one stream message ``[topic, header, data]``: an output chunk, the ``finished``
    event, or None for anything else (other events, malformed messages: never trusted)."""
    if len(frames) != 3:
        return None
    header = decode_stream_header(frames[1])
    if isinstance(header, EventHeader):
        return FINISHED if header.event == "finished" else None
    if header is None:
        return None
    return Chunk(header.stream, header.offset, bytes(frames[2]))


@dataclass
class Follower:
    streams: tuple[str, ...]
    expected: dict[str, int] = field(default_factory=dict)
    final_sizes: dict[str, int] | None = None
    gaps_filled: int = 0
    duplicates: int = 0

    @classmethod
    def start(cls, streams: Iterable[str], from_offset: int = 0) -> Follower:
        s = tuple(streams)
        for name in s:
            if name not in OUTPUT_STREAMS:
                raise ValueError(f"unknown stream {name!r}")
        return cls(streams=s, expected={name: from_offset for name in s})

    def read_window(self, stream: str, until: int | None) -> tuple[int, int | None] | None:
        """The next store read ``(offset, max_bytes)`` towards ``until`` (None: the current end;
        max_bytes None: the daemon's default), or None when ``until`` is reached."""
        exp = self.expected[stream]
        if until is not None and exp >= until:
            return None
        return exp, None if until is None else min(until - exp, MAX_READ_BYTES)

    def apply_read(self, stream: str, until: int | None, piece: OutputSlice) -> tuple[Chunk | None, bool]:
        """Apply one ``read_output`` reply: the part to deliver, and whether to read again."""
        chunk = self.stored(stream, piece.offset, piece.data)
        more = bool(piece.data) and not (until is None and piece.next_offset >= piece.size)
        return chunk, more

    def accept(self, chunk: Chunk) -> tuple[Chunk | None, tuple[str, int, int] | None]:
        """Classify a live chunk. Returns (part to deliver now, gap to fill first as
        (stream, start, end)). When a gap is returned, fill it, then call ``accept`` again."""
        exp = self.expected.get(chunk.stream)
        if exp is None:
            return None, None
        end = chunk.offset + len(chunk.data)
        if end <= exp:
            self.duplicates += 1
            return None, None
        if chunk.offset > exp:
            return None, (chunk.stream, exp, chunk.offset)
        part = chunk.data[exp - chunk.offset:]
        self.expected[chunk.stream] = end
        return Chunk(chunk.stream, exp, part), None

    def stored(self, stream: str, offset: int, data: bytes) -> Chunk | None:
        """Apply bytes read from the store at ``offset``."""
        exp = self.expected.get(stream)
        if exp is None or not data:
            return None
        end = offset + len(data)
        if end <= exp or offset > exp:
            return None
        part = data[exp - offset:]
        self.expected[stream] = end
        return Chunk(stream, exp, part)

    def finished(self, sizes: dict[str, int]) -> None:
        self.final_sizes = {s: sizes.get(s, 0) for s in self.streams}

    @property
    def complete(self) -> bool:
        if self.final_sizes is None:
            return False
        return all(self.expected[s] >= self.final_sizes[s] for s in self.streams)


def follow(effect_id: str, f: Follower) -> Ops[None]:
    """Emit every byte of ``f.streams`` from ``f.expected`` on, in order, until the effect is
    final and each stream was read to its final size. The driver has subscribed already."""
    # The daemon answers a subscription with a 'subscribed' event: from then on nothing
    # published is missed (and anything earlier is in the store). A frame that ends this wait
    # stays queued and is handled below.
    yield Poll(SUBSCRIBED_WAIT)
    yield from _catch_up(effect_id, f)
    last_progress = time.monotonic()
    while not f.complete:
        if f.final_sizes is not None:
            for name in f.streams:
                yield from _fill(effect_id, f, name, f.final_sizes[name])
            return
        # Check the store when nothing arrives, and also when only unrelated messages arrive
        # (other subscribers' 'subscribed' events): a dropped 'finished' must not leave the
        # stream waiting forever.
        quiet = time.monotonic() - last_progress >= IDLE_CHECK
        if quiet or not (yield Poll(IDLE_CHECK)):
            last_progress = time.monotonic()
            yield from _catch_up(effect_id, f)
            continue
        live = parse_frame((yield Recv()))
        if live == FINISHED:
            f.finished((yield from _final_sizes(effect_id, f)))
            continue
        if not isinstance(live, Chunk):
            continue
        part, gap = f.accept(live)
        if gap is not None:
            f.gaps_filled += 1
            yield from _fill(effect_id, f, gap[0], gap[2])
            part, _ = f.accept(live)
        if part is not None:
            last_progress = time.monotonic()
            yield Emit(part)


def _catch_up(effect_id: str, f: Follower) -> Ops[None]:
    """Read every stream to the store's current end; note the final sizes if it is final."""
    for name in f.streams:
        yield from _fill(effect_id, f, name, None)
    if (yield from status(effect_id)).final:
        f.finished((yield from _final_sizes(effect_id, f)))


def _fill(effect_id: str, f: Follower, stream: str, until: int | None) -> Ops[None]:
    """Read the store from f.expected[stream] up to ``until`` (None: to the current end)."""
    while (window := f.read_window(stream, until)) is not None:
        chunk, more = f.apply_read(stream, until, (yield from read_output(effect_id, stream, *window)))
        if chunk is not None:
            yield Emit(chunk)
        if not more:
            return


def _final_sizes(effect_id: str, f: Follower) -> Ops[dict[str, int]]:
    sizes = {}
    for name in f.streams:
        sizes[name] = (yield from read_output(effect_id, name, 0, 1)).size
    return sizes
