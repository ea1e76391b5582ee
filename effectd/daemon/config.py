"""Daemon settings and their documented defaults (see README "Limits and defaults")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effectd.daemon.proctree import DEFAULT_KILL_GRACE
from effectd.ipc.constants import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_ORPHAN_TIMEOUT,
    DEFAULT_RETAIN_BYTES,
    DEFAULT_RETAIN_COUNT,
    DEFAULT_RETAIN_DAYS,
    HEARTBEAT_INTERVAL,
)
from effectd.ipc.layout import outputs_root


@dataclass
class DaemonConfig:
    runtime_dir: Path
    state_dir: Path
    parallel: int = 8
    """Effects running at once, whatever the CPU count (most effects wait on I/O or children)."""
    min_workers: int = 1
    """Workers kept warm."""
    max_workers: int = 8
    """Upper bound on worker processes (python effects take one each)."""
    worker_slots: int = 32
    """Shell/sleep effects one worker supervises at once."""
    worker_idle_timeout: float = 60.0
    max_effects_per_worker: int = 0
    """Recycle a worker after this many effects (0: never)."""
    max_worker_rss: int = 0
    """Recycle a worker whose RSS passes this many bytes once idle (0: never)."""
    max_queued: int = 100_000
    max_waits: int = 10_000
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    kill_grace: float = DEFAULT_KILL_GRACE
    drain_timeout: float = 30.0
    adopt_grace: float = 10.0
    orphan_timeout: float = DEFAULT_ORPHAN_TIMEOUT
    heartbeat: float = HEARTBEAT_INTERVAL
    retain_days: float = DEFAULT_RETAIN_DAYS
    retain_count: int = DEFAULT_RETAIN_COUNT
    retain_bytes: int = DEFAULT_RETAIN_BYTES
    log_level: str = "INFO"
    log_file: Path | None = None

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"

    @property
    def outputs_dir(self) -> Path:
        return outputs_root(self.state_dir)
