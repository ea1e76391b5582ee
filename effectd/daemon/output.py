"""The worker's writer for one effect's output files, with the per-stream cap.

The worker, not the daemon, owns the bytes: it appends each chunk to the effect's file before
publishing it, so output keeps accumulating while no daemon runs and a late subscriber can always
read what it missed. When a byte stream passes ``max_output_bytes`` the writer keeps the head,
holds a bounded ring of the most recent bytes, and on close appends a one-line truncation marker
followed by the tail - so the file ends with what users most often need (the error at the end).

A full filesystem never ends the worker: a failed write (or one that would eat into the room the
journal keeps, ``STATE_HEADROOM_BYTES``) stops that stream for the attempt, counts what follows as
truncated and sets ``write_error``, which turns the attempt's success into ``failed/disk_full``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from effectd.ipc.constants import DEFAULT_MAX_OUTPUT_BYTES
from effectd.ipc.layout import stream_path

TAIL_KEEP_BYTES = 1024 * 1024
STATE_HEADROOM_BYTES = 2 * 1024 * 1024
"""Free space output never takes (at most 1/8 of the filesystem): below it a write fails as if the
disk were full. It leaves the journal (on the same filesystem) room to commit the conclusions of
the effects whose output was cut: twice the journal's own reserve (``journal.store.reserve_size``),
which the journal frees when the disk fills up and which output must not take back."""


def headroom(st: os.statvfs_result) -> int:
    return min(STATE_HEADROOM_BYTES, st.f_blocks * st.f_frsize // 8)


DISK_FULL = "disk_full"
"""Reason of an effect that would have succeeded but lost output to a full filesystem (ENOSPC,
EDQUOT): it ends ``failed`` - its output is incomplete, and nothing ``after`` it may take it
for whole - with its exit code kept and the lost bytes in ``truncated``."""
OUTPUT_ERROR = "output_error"
"""Likewise for any other error writing the output file (e.g. EIO)."""


def truncation_marker(dropped: int) -> bytes:
    return f"\n[effectd: {dropped} bytes of output truncated here]\n".encode()


def lost_marker(dropped: int, reason: str) -> bytes:
    return f"\n[effectd: {dropped} bytes of output lost here ({reason})]\n".encode()


@dataclass
class _StreamFile:
    path: Path
    fd: int = -1
    offset: int = 0        # bytes in the file (the stream offset of the next byte)
    written: int = 0       # bytes kept during this attempt
    dropped: int = 0
    tail: bytearray = field(default_factory=bytearray)
    failed: bool = False   # a write failed: everything after it is dropped, never half-written


class OutputWriter:
    """Appends one effect's output; ``write`` returns (offset, bytes actually kept) to publish."""

    def __init__(self, effect_dir: Path, max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        self.dir = effect_dir  # made by the daemon at assignment (the claim file lives there)
        self.max_bytes = max_bytes
        self.tail_keep = min(TAIL_KEEP_BYTES, max_bytes // 4)
        self._head_cap = max_bytes - self.tail_keep
        self._streams: dict[str, _StreamFile] = {}
        self.write_error: str | None = None
        """``DISK_FULL`` or ``OUTPUT_ERROR`` once a write failed (the worker carries on)."""

    def _stream(self, name: str) -> _StreamFile:
        sf = self._streams.get(name)
        if sf is None:
            path = stream_path(self.dir, name)
            sf = _StreamFile(path=path)
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                sf.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                sf.offset = os.fstat(sf.fd).st_size
            except OSError as exc:
                self._failed(sf, exc)
            self._streams[name] = sf
        return sf

    def _failed(self, sf: _StreamFile, exc: OSError) -> None:
        sf.failed = True
        if self.write_error is None:
            self.write_error = DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else OUTPUT_ERROR

    def write(self, name: str, data: bytes) -> tuple[int, bytes]:
        """Append ``data``; returns the offset it starts at and the part kept in the file."""
        sf = self._stream(name)
        start = sf.offset
        if sf.failed:
            sf.dropped += len(data)
            return start, b""
        room = self._head_cap - sf.written if sf.dropped == 0 else 0
        keep = data if len(data) <= room else data[: max(room, 0)]
        if keep:
            keep = self._append(sf, keep)
            if sf.failed:  # what the file did not take is lost, and so is all that follows
                sf.dropped += len(data) - len(keep)
                return start, keep
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
        if sf.failed or sf.dropped or sf.written + len(packed) > self.max_bytes:
            sf.dropped += len(packed)
            return sf.offset, b""
        start = sf.offset
        kept = self._append(sf, packed)
        if len(kept) < len(packed):
            # A value is one msgpack object: a partial one must not stay in the file.
            self._cut(sf, start)
            sf.dropped += len(packed)
            return start, b""
        return start, packed

    def _append(self, sf: _StreamFile, data: bytes) -> bytes:
        """Write ``data``; returns what the file took (all of it unless a write failed, which
        marks the stream failed)."""
        view = memoryview(data)
        done = 0
        while done < len(data):
            try:
                st = os.fstatvfs(sf.fd)
                if st.f_bavail * st.f_frsize < headroom(st) + len(data) - done:
                    raise OSError(errno.ENOSPC, "state filesystem at its headroom for the journal")
                done += os.write(sf.fd, view[done:])
            except OSError as exc:
                self._failed(sf, exc)
                break
        sf.offset += done
        sf.written += done
        return data[:done]

    def _cut(self, sf: _StreamFile, size: int) -> None:
        """Truncate the file back to ``size`` (freeing space: truncation needs none)."""
        try:
            os.ftruncate(sf.fd, size)
        except OSError:
            return
        sf.written -= sf.offset - size
        sf.offset = size

    def finish(self) -> list[tuple[str, int, bytes]]:
        """Close every stream; for truncated byte streams append marker + tail first.

        Returns the (stream, offset, data) appended, so the caller can publish it."""
        appended: list[tuple[str, int, bytes]] = []
        for name, sf in self._streams.items():
            if name == "value" or sf.fd < 0 or not (sf.dropped or sf.failed):
                continue
            if sf.failed:
                note = lost_marker(sf.dropped, self.write_error or OUTPUT_ERROR)
                dropped_after = sf.dropped
            else:
                note = truncation_marker(sf.dropped - len(sf.tail)) + bytes(sf.tail)
                dropped_after = sf.dropped - len(sf.tail)  # the tail is kept after all
            sf.failed = False  # one more try: space may be back by now
            start = sf.offset
            if len(self._append(sf, note)) == len(note):
                appended.append((name, start, note))
                sf.dropped = dropped_after
            else:
                self._cut(sf, start)  # never half a marker; all that is missing counts as dropped
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
