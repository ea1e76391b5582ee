"""Per-effect output files: ``<state>/outputs/<effect id>/{stdout,stderr,value}``.

Workers append to these files as their effects write (so output survives a daemon crash);
the daemon only reads them, to serve ``read_output`` at any offset. The journal records sizes,
never bytes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from effectd.ipc.schema import OUTPUT_STREAMS


class OutputStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def effect_dir(self, effect_id: str) -> Path:
        return self.root / effect_id

    def path(self, effect_id: str, stream: str) -> Path:
        if stream not in OUTPUT_STREAMS:
            raise ValueError(f"not an output stream: {stream}")
        return self.root / effect_id / stream

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

    def final_marker(self, effect_id: str) -> Path:
        return self.root / effect_id / "final"

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
