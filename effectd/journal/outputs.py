"""Per-effect output files (their layout: :mod:`effectd.ipc.layout`).

Workers append to these files as their effects write (so output survives a daemon crash);
the daemon only reads them, to serve ``read_output`` at any offset. The journal records sizes,
never bytes.

The same directory holds one ``.claim-<attempt>`` file per attempt: the fence that makes
"did this attempt ever start?" answerable after a crash. A worker creates it (``O_EXCL``)
before it starts anything; a daemon recovering an attempt nobody claimed creates it first
(content ``void``). Whoever creates it wins, so an attempt voided and re-queued by a new daemon
can never also be started by a worker that reads the old daemon's assignment late.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from effectd.ipc import layout
from effectd.ipc.layout import claim_path, final_marker, stream_path
from effectd.ipc.schema import OUTPUT_STREAMS

VOID = b"void\n"
"""Content of a claim file created by a daemon: the attempt never started and never will."""


def claim_attempt(effect_dir: Path, attempt: int, owner: str) -> None:
    """Claim ``attempt`` for a worker before starting it. Raises FileExistsError if it was
    claimed or voided already (a stale or duplicate assignment: do not run it), another
    OSError if the directory is gone (the effect was collected) or cannot be written."""
    fd = os.open(claim_path(effect_dir, attempt), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{owner}\n".encode())
    finally:
        os.close(fd)


class OutputStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def effect_dir(self, effect_id: str) -> Path:
        return layout.effect_dir(self.root, effect_id)

    def path(self, effect_id: str, stream: str) -> Path:
        return stream_path(self.effect_dir(effect_id), stream)

    def size(self, effect_id: str, stream: str) -> int:
        try:
            return self.path(effect_id, stream).stat().st_size
        except FileNotFoundError:
            return 0

    def sizes(self, effect_id: str) -> dict[str, int]:
        return {s: self.size(effect_id, s) for s in OUTPUT_STREAMS}

    def read(self, effect_id: str, stream: str, offset: int, max_bytes: int) -> bytes:
        try:
            fd = os.open(self.path(effect_id, stream), os.O_RDONLY)
        except FileNotFoundError:
            return b""
        try:
            return os.pread(fd, max_bytes, offset)
        finally:
            os.close(fd)

    def prepare(self, effect_id: str) -> None:
        """Create the effect's directory before assigning it: a worker claims an attempt only
        inside an existing directory, so a stale assignment of a collected effect cannot run."""
        self.effect_dir(effect_id).mkdir(mode=0o700, exist_ok=True)

    def void_attempt(self, effect_id: str, attempt: int) -> bool:
        """Make sure no worker can start ``attempt`` any more. True if it never started (we hold
        its claim now, or an earlier daemon voided it); False if a worker claimed it, or if the
        fence cannot be written (then it may have started)."""
        d = self.effect_dir(effect_id)
        tmp = d / f".void-{attempt}-{os.getpid()}"
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_bytes(VOID)
            try:
                os.link(tmp, claim_path(d, attempt))  # atomic create-with-content
                return True
            except FileExistsError:
                return claim_path(d, attempt).read_bytes() == VOID
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def final_marker(self, effect_id: str) -> Path:
        return final_marker(self.effect_dir(effect_id))

    def mark_final(self, effect_id: str) -> None:
        """Tell readers tailing the files (``stdin_from`` consumers) that no more bytes come."""
        d = self.effect_dir(effect_id)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.final_marker(effect_id).touch(mode=0o600)

    def remove(self, effect_id: str) -> int:
        """Delete an effect's files; returns the bytes freed."""
        d = self.effect_dir(effect_id)
        freed = sum(self.size(effect_id, s) for s in OUTPUT_STREAMS)
        shutil.rmtree(d, ignore_errors=True)
        return freed
