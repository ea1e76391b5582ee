"""Exact streams from a lossy PUB: the offset bookkeeping shared by the sync and async clients.

The follower subscribes first, then reads what is stored (``read_output``), then applies live
chunks: a chunk entirely before the expected offset is a duplicate and is dropped; one that
starts after it reveals a gap, which is filled from the store before the chunk is used. The
stream ends when the effect is final and every stream has been read to its final size. This is
the zguide's Clone pattern with the output files as the snapshot (see docs/protocol.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from effectd.client.records import Chunk, OutputSlice
from effectd.ipc.messages import EventHeader, decode_stream_header
from effectd.ipc.schema import MAX_READ_BYTES, OUTPUT_STREAMS

FINISHED: Literal["finished"] = "finished"
SUBSCRIBED_WAIT = 2.0
"""Seconds to wait for the daemon's 'subscribed' event before reading the store anyway."""
BUSY_GIVE_UP = 60.0
"""Seconds a ``read_output`` answered ``busy`` is retried before the error is raised (the daemon
frees its read budget within 2 s even if the readers holding it vanished)."""
IDLE_CHECK = 0.25
"""A follower in which no stream advanced for this long checks the store (covers a dropped
'finished' event, even while unrelated messages keep arriving)."""


def busy_backoff() -> Iterator[float]:
    """Delays between retries of a ``read_output`` answered ``busy`` (protocol.md §5.9): 10 ms,
    doubling to 250 ms, with jitter so that many readers do not retry in step; ends after
    BUSY_GIVE_UP seconds."""
    delay = 0.01
    spent = 0.0
    while spent < BUSY_GIVE_UP:
        pause = delay * random.uniform(0.5, 1.0)
        spent += pause
        yield pause
        delay = min(delay * 2, 0.25)


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
