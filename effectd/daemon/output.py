"""The worker's writer for one effect's output files, with the per-stream cap.

The worker, not the daemon, owns the bytes: it appends each chunk to the effect's file before
publishing it, so output keeps accumulating while no daemon runs and a late subscriber can always
read what it missed. When a byte stream passes ``max_output_bytes`` the writer keeps the head,
holds a bounded ring of the most recent bytes, and on close appends a one-line truncation marker
followed by the tail - so the file ends with what users most often need (the error at the end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
TAIL_KEEP_BYTES = 1024 * 1024


def truncation_marker(dropped: int) -> bytes:
    return f"\n[effectd: {dropped} bytes of output truncated here]\n".encode()


@dataclass
class _StreamFile:
    path: Path
    fd: int = -1
    offset: int = 0        # bytes in the file (the stream offset of the next byte)
    written: int = 0       # bytes kept during this attempt
    dropped: int = 0
    tail: bytearray = field(default_factory=bytearray)


class OutputWriter:
    """Appends one effect's output; ``write`` returns (offset, bytes actually kept) to publish."""

    def __init__(self, effect_dir: Path, max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        self.dir = effect_dir  # made by the daemon at assignment (the claim file lives there)
        self.max_bytes = max_bytes
        self.tail_keep = min(TAIL_KEEP_BYTES, max_bytes // 4)
        self._head_cap = max_bytes - self.tail_keep
        self._streams: dict[str, _StreamFile] = {}

    def _stream(self, name: str) -> _StreamFile:
        sf = self._streams.get(name)
        if sf is None:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.dir / name
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            sf = _StreamFile(path=path, fd=fd, offset=os.fstat(fd).st_size)
            self._streams[name] = sf
        return sf

    def write(self, name: str, data: bytes) -> tuple[int, bytes]:
        """Append ``data``; returns the offset it starts at and the part kept in the file."""
        sf = self._stream(name)
        start = sf.offset
        room = self._head_cap - sf.written if sf.dropped == 0 else 0
        keep = data if len(data) <= room else data[: max(room, 0)]
        if keep:
            self._append(sf, keep)
        rest = data[len(keep):]
        if rest:
            if name == "value":
                sf.dropped += len(rest)  # values are whole msgpack objects: dropped, never cut
            else:
                sf.dropped += len(rest)
                sf.tail += rest
                if len(sf.tail) > self.tail_keep:
                    excess = len(sf.tail) - self.tail_keep
                    del sf.tail[:excess]
        return start, keep

    def write_value(self, packed: bytes) -> tuple[int, bytes]:
        """Append one msgpack-encoded value whole, or drop it whole once over the cap."""
        sf = self._stream("value")
        if sf.dropped or sf.written + len(packed) > self.max_bytes:
            sf.dropped += len(packed)
            return sf.offset, b""
        start = sf.offset
        self._append(sf, packed)
        return start, packed

    def _append(self, sf: _StreamFile, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(sf.fd, view)
            view = view[n:]
        sf.offset += len(data)
        sf.written += len(data)

    def finish(self) -> list[tuple[str, int, bytes]]:
        """Close every stream; for truncated byte streams append marker + tail first.

        Returns the (stream, offset, data) appended, so the caller can publish it."""
        appended: list[tuple[str, int, bytes]] = []
        for name, sf in self._streams.items():
            if sf.dropped and name != "value":
                dropped_middle = sf.dropped - len(sf.tail)
                data = truncation_marker(dropped_middle) + bytes(sf.tail)
                start = sf.offset
                self._append(sf, data)
                appended.append((name, start, data))
                sf.dropped = dropped_middle  # the tail was kept after all: report what is gone
                sf.tail = bytearray()
        self.close()
        return appended

    def close(self) -> None:
        for sf in self._streams.values():
            if sf.fd >= 0:
                os.close(sf.fd)
                sf.fd = -1

    def sizes(self) -> dict[str, int]:
        return {name: sf.offset for name, sf in self._streams.items()}

    def truncated(self) -> dict[str, int]:
        return {name: sf.dropped for name, sf in self._streams.items() if sf.dropped}
