"""A full state filesystem strands nothing (issue 14.3).

The state dir is a small tmpfs filled to the last byte while effects run. Output that cannot be
written is counted as truncated and the effect ends ``failed`` with reason ``disk_full`` (its exit
code kept); the worker survives; no effect stays ``running``; once space returns, new effects
run and cancel works. Needs root for the mount (CI runs as root).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from effectd.client import Client, EffectState, shell_spec
from tests.conftest import DaemonHandle, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

TMPFS_SIZE = "8m"  # room for the journal's 1 MiB reserve and output's 2 MiB headroom
EFFECTS = 6
OUTPUT_BYTES = 200_000


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem refuses: afterwards not one more block is free."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        for size in (4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def _mounted_daemon(factory: Any, size: str) -> DaemonHandle:
    d: DaemonHandle = factory("--kill-grace", "0.5", "--max-workers", "1", start=False)
    d.state.mkdir(parents=True, mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(d.state)], check=True)
    return d


@pytest.fixture
def tmpfs_daemon(daemon_factory: Any) -> Iterator[Any]:
    """``start(size)``: a daemon whose state dir is a fresh tmpfs of that size, unmounted afterwards."""
    started: list[DaemonHandle] = []

    def start(size: str) -> DaemonHandle:
        d = _mounted_daemon(daemon_factory, size)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        with contextlib.suppress(OSError):
            (d.state / "filler").unlink()
        with contextlib.suppress(Exception):
            d.stop()
        subprocess.run(["umount", "-l", str(d.state)], check=False)


def _statuses_when_final(c: Client, ids: list[str], timeout: float) -> list[Any]:
    """Poll with status (read-only: answered even while nothing can be committed), not wait."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: all(r.final for r in c.status_many(ids)), timeout=timeout, what="final states")
    return c.status_many(ids)


def _run_writers_on_full_disk(d: DaemonHandle, c: Client) -> tuple[psutil.Process, list[str]]:
    """Start effects that write output once the state filesystem is full; return the worker and ids."""
    warm = c.wait(c.submit(shell_spec("echo warm")), timeout=20)
    assert warm.state is EffectState.SUCCEEDED, warm
    (worker,) = d.worker_processes()
    go = d.root / "go"
    writer = (f"while [ ! -e {go} ]; do sleep 0.02; done; "
              f"head -c {OUTPUT_BYTES} /dev/zero | tr '\\0' x; echo tail >&2; exit 0")
    ids = [c.submit(shell_spec(writer)) for _ in range(EFFECTS)]
    # Their processes must exist before the disk fills (``running`` alone is only the assignment).
    wait_until(lambda: all(r.pid for r in c.status_many(ids)), what="the writers to start")
    _fill(d.state / "filler")
    go.touch()
    return worker, ids


def _assert_disk_full_outcomes(records: list[Any]) -> None:
    """Every effect is final, and tells the truth about its output: ``failed/disk_full`` with the
    lost bytes counted, or - if space came back in time (the journal frees its reserve and WAL) -
    ``succeeded`` with all of it."""
    stranded = [r.state.value for r in records if not r.final]
    assert not stranded, f"{len(stranded)}/{len(records)} effects stranded on a full disk: {stranded}"
    for r in records:
        if r.state is EffectState.SUCCEEDED:
            assert (r.truncated, r.sizes.get("stdout")) == ({}, OUTPUT_BYTES), r
        else:
            assert (r.state, r.reason, r.exit_code) == (EffectState.FAILED, "disk_full", 0), r
            assert sum(r.truncated.values()) > 0, r.truncated
    assert any(r.reason == "disk_full" for r in records), "the disk was never full for them"


def _assert_works_again(d: DaemonHandle, c: Client, worker: psutil.Process) -> None:
    ok = c.wait(c.submit(shell_spec("echo back")), timeout=20)
    assert (ok.state, c.output(ok.id)) == (EffectState.SUCCEEDED, b"back\n")
    long = c.submit(shell_spec("echo up; sleep 60"))
    wait_until(lambda: c.output(long) == b"up\n", what="the long effect to start")
    c.cancel(long)
    assert c.wait(long, timeout=10).state is EffectState.CANCELLED
    assert [p.pid for p in d.worker_processes()] == [worker.pid]


@pytest.mark.slow
def test_full_state_dir_strands_nothing(tmpfs_daemon: Any) -> None:
    """Effects are concluded while the disk is still full (the journal's reserve is for that)."""
    d = tmpfs_daemon(TMPFS_SIZE)
    c = d.client()
    worker, ids = _run_writers_on_full_disk(d, c)
    _assert_disk_full_outcomes(_statuses_when_final(c, ids, timeout=30))
    assert worker.is_running() and [p.pid for p in d.worker_processes()] == [worker.pid]
    (d.state / "filler").unlink()  # space returns: everything works again
    _assert_works_again(d, c, worker)


@pytest.mark.slow
def test_conclusions_refused_by_a_full_journal_land_once_space_returns(tmpfs_daemon: Any) -> None:
    """On a 2 MiB filesystem the reserve (1/16 of it) may not hold every conclusion: those the
    journal refuses are not lost - the daemon restores the effects as the journal has them and
    the worker re-sends its reports until they commit, once space is back."""
    d = tmpfs_daemon("2m")
    c = d.client()
    worker, ids = _run_writers_on_full_disk(d, c)
    wait_until(lambda: not d.effect_processes(set(ids)), what="the writers to exit")
    assert worker.is_running()
    (d.state / "filler").unlink()
    _assert_disk_full_outcomes(_statuses_when_final(c, ids, timeout=20))
    _assert_works_again(d, c, worker)
