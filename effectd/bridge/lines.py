"""The bridge's two byte streams: request lines from stdin, protocol lines to a private stdout.

Reading never blocks the event loop (pipes, sockets and terminals through the loop's reader;
files and in-memory streams in a thread), an over-long line is skipped and reported, and stdout
is kept for protocol lines only (fd 1 is pointed at stderr for everything else in the process).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from collections.abc import AsyncGenerator, Callable
from typing import IO, Any

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest request line accepted (the daemon's own request limit)."""
READ_SIZE = 64 * 1024


def _pollable_fd(stream: IO[Any]) -> int | None:
    """The fd of a pipe, socket or terminal (reads may block: poll them); None for files,
    other devices (/dev/null) and in-memory streams (reads never block, and epoll refuses
    files and most devices)."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd):
        return fd
    return None


async def _read_chunks(stdin: IO[Any]) -> AsyncGenerator[bytes, None]:
    """Bytes from ``stdin`` until EOF without blocking the loop: pipes, sockets and terminals
    through the loop's reader; files and in-memory streams in a thread (they never block)."""
    import asyncio

    loop = asyncio.get_running_loop()
    fd = _pollable_fd(stdin)
    if fd is not None:
        was_blocking = os.get_blocking(fd)
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
        except (OSError, ValueError):  # e.g. /dev/null: epoll says EPERM
            pipe.close()
            os.set_blocking(fd, was_blocking)
        else:
            try:
                while chunk := await reader.read(READ_SIZE):
                    yield chunk
            finally:
                transport.close()
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, was_blocking)  # O_NONBLOCK is shared with our parent
            return
    read: Callable[[int], Any] = getattr(stdin, "read1", None) or stdin.read
    while True:
        data = await asyncio.to_thread(read, READ_SIZE)
        if not data:
            return
        yield data.encode() if isinstance(data, str) else bytes(data)


async def read_lines(stdin: IO[Any], max_line: int = MAX_LINE_BYTES) -> AsyncGenerator[bytes | None, None]:
    """Lines of ``stdin`` without their newline; None stands for a line longer than
    ``max_line`` (its bytes are skipped). A last line without newline counts."""
    buf = bytearray()
    skipping = False
    async with contextlib.aclosing(_read_chunks(stdin)) as chunks:
        async for chunk in chunks:
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                piece = chunk[start:] if nl < 0 else chunk[start:nl]
                if not skipping:
                    buf += piece
                    if len(buf) > max_line:
                        buf.clear()
                        skipping = True
                        yield None
                if nl < 0:
                    break
                if skipping:
                    skipping = False
                else:
                    line = bytes(buf)
                    buf.clear()
                    yield line
                start = nl + 1
    if buf and not skipping:
        yield bytes(buf)


def line_writer(stdout: IO[Any]) -> Callable[[str], None]:
    """Write-and-flush of whole lines to a text or binary stream."""
    if isinstance(stdout, io.TextIOBase):
        def write_text(line: str) -> None:
            stdout.write(line)
            stdout.flush()

        return write_text

    def write_bytes(line: str) -> None:
        stdout.write(line.encode("ascii"))
        stdout.flush()

    return write_bytes


def protocol_streams() -> tuple[IO[Any], IO[Any], Callable[[], None]]:
    """Binary stdin, and a private stdout for protocol lines. When fd 1 is a real descriptor it
    is duplicated for the protocol and fd 1 itself (and ``sys.stdout``) is pointed at stderr,
    so nothing else in the process can write to the protocol stream."""
    stdin = sys.stdin.buffer
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return stdin, sys.stdout.buffer, lambda: None  # in-memory stdout (e.g. click's runner)
    sys.stdout.flush()
    proto = os.fdopen(os.dup(fd), "wb")
    saved = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr

    def restore() -> None:
        with contextlib.suppress(OSError, ValueError):
            proto.close()
        os.dup2(saved, fd)
        os.close(saved)
        sys.stdout = real_stdout

    return stdin, proto, restore
