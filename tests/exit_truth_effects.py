"""Python effects for tests/test_exit_truth.py (importable by workers: the test daemon's PYTHONPATH has tests/)."""

from __future__ import annotations

import subprocess
import time


def child_exit_status(code: int = 3, linger: float = 0.6) -> int | None:
    """Start a child of the worker that exits with ``code``, let it become a zombie for several of
    the worker's reap intervals, then collect it through its own Popen: the status must be ``code``."""
    proc = subprocess.Popen(["sh", "-c", f"exit {code}"])
    time.sleep(linger)  # the effect's own behaviour under test, not test synchronisation
    return proc.wait(timeout=10)
