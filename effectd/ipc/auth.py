"""The daemon's worker key: workers execute only messages MAC'd with it.

Binding a ``workers.sock`` is all it takes to look like a daemon to a worker, so the socket path
alone is not a proof of identity (see docs/architecture.md, "Trust boundary"). The daemon keeps
32 random bytes in ``<state>/worker.key`` (0600; a restarted daemon reads the same key, so it can
re-adopt the workers of the previous one) and hands them to each worker it spawns through an
inherited pipe - never the environment, which the worker's effects inherit. Every daemon->worker
message carries ``hmac-sha256(key, body)`` as an extra frame; the worker drops anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path

from effectd.ipc.errors import UnsafeDirectory

KEY_FILE = "worker.key"
KEY_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size


def sign(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, "sha256")


def verify(key: bytes, body: bytes, mac: bytes) -> bool:
    return len(mac) == MAC_BYTES and hmac.compare_digest(sign(key, body), mac)


def load_or_create_key(state: Path) -> bytes:
    """The key in ``state/worker.key``, created (0600, never through a symlink) if missing.
    The caller holds the state dir's lock, so nobody creates it concurrently; it is written to a
    temporary file and renamed, so a crash never leaves a short key behind."""
    path = state / KEY_FILE
    if not os.path.lexists(path):
        tmp = state / f"{KEY_FILE}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafeDirectory(f"cannot read the worker key {path}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077 or not stat.S_ISREG(st.st_mode):
            raise UnsafeDirectory(f"refusing the worker key {path}: it must be a regular file of ours, mode 0600")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise UnsafeDirectory(f"the worker key {path} is damaged ({len(key)} bytes); remove it and restart "
                              f"(running workers of the previous daemon will then not be re-adopted)")
    return key


def key_pipe(key: bytes) -> int:
    """A pipe holding ``key``; returns its read end for a child to inherit (the caller closes it)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(w, key)  # 32 bytes: always fits in the pipe buffer
    finally:
        os.close(w)
    return r


def read_key_fd(fd: int) -> bytes:
    """Read the key a daemon passed on ``fd`` and close it, so no effect can inherit it."""
    try:
        data = b""
        while len(data) < KEY_BYTES:
            chunk = os.read(fd, KEY_BYTES - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(data) != KEY_BYTES:
        raise ValueError(f"expected a {KEY_BYTES}-byte key on fd {fd}, got {len(data)} bytes")
    return data
