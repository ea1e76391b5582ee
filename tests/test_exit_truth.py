"""Exit status truth: an effect's reported exit status is the one its process really had.

A worker hosts many effects; their main processes are all its children, and (as a subreaper) so
are the orphans those effects leave behind. Only the owner of a pid may collect its exit status:
anything else that reaps it (a tree kill, the orphan reaper) makes the owner's ``waitpid`` fail
with ECHILD, which ``subprocess.Popen`` reports as exit code 0 - a failed effect reported as
``succeeded``. These tests run the reproduction of issue 13.1 against a real daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from effectd.client import EffectState, python_spec, shell_spec
from effectd.daemon.ids import UlidGenerator
from effectd.daemon.kinds.shell import EXIT_STATUS_UNKNOWN, ShellRun
from effectd.daemon.output import OutputWriter
from effectd.daemon.proctree import TreeKill, collect_exit_status
from effectd.ipc import messages
from tests.conftest import DaemonHandle, wait_until
from tests.proctools import kill_tree

EXIT3 = "sleep 0.3; exit 3"
# Leaves a SIGTERM-ignoring process behind: the worker tree-kills it (SIGKILL after the grace)
# while other effects' main processes exit around it.
LEAVER = "(trap '' TERM; while :; do sleep 0.1; done) >/dev/null 2>&1 </dev/null & exit 0"
ROUNDS = 3
PER_ROUND = 100
LEAVERS_PER_ROUND = 10


def _misreported(records: list[Any]) -> list[str]:
    return [f"{r.id}: {r.state.value} exit_code={r.exit_code} reason={r.reason}" for r in records
            if (r.state, r.exit_code) != (EffectState.FAILED, 3)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_exit_status_never_misreported_beside_leftover_kills(daemon_factory: Any) -> None:
    d: DaemonHandle = daemon_factory()  # default daemon: the reproduction's conditions
    c = d.client()
    bad: list[str] = []
    for _ in range(ROUNDS):
        specs = []
        for i in range(PER_ROUND):
            specs.append(shell_spec(EXIT3, name="exit3"))
            if i % (PER_ROUND // LEAVERS_PER_ROUND) == 0:
                specs.append(shell_spec(LEAVER, name="leaver"))
        ids = c.submit_many(specs)
        records = c.wait_many(ids, timeout=90)
        assert all(r.final for r in records), [r.state for r in records if not r.final]
        bad += _misreported([r for r in records if r.name == "exit3"])
        leavers = [r for r in records if r.name == "leaver"]
        assert all(r.state is EffectState.SUCCEEDED for r in leavers), [(r.state, r.reason) for r in leavers]
    assert not bad, f"{len(bad)}/{ROUNDS * PER_ROUND} exit-3 effects misreported: {bad[:5]}"


@pytest.mark.slow
def test_python_effect_collects_its_own_subprocess_status(daemon: DaemonHandle) -> None:
    c = daemon.client()
    ids = [c.submit(python_spec("exit_truth_effects:child_exit_status", [3])) for _ in range(3)]
    records = c.wait_many(ids, timeout=20)
    assert [(r.state, r.result) for r in records] == [(EffectState.SUCCEEDED, 3)] * 3, \
        [(r.state.value, r.result, r.error) for r in records]


def _tick_until_done(run: ShellRun, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while run.report is None:
        assert time.monotonic() < deadline, "run did not finish"
        for fd in run.fds():
            run.on_readable(fd)
        run.tick(time.time())
        time.sleep(0.01)  # bounded poll of a run driven by hand (no worker loop here)
    return run.report


def test_unknowable_exit_status_is_lost_never_success(tmp_path: Path) -> None:
    """If the main pid was reaped behind the run's back (ECHILD), the run ends ``lost`` with
    reason ``exit_status_unknown`` - and the daemon's schema accepts that report."""
    run = ShellRun(UlidGenerator().new(), 1, {"kind": "shell", "command": "exit 3"},
                   OutputWriter(tmp_path / "out"), kill_grace=1.0, base_env=dict(os.environ))
    assert run.pid is not None
    wait_until(lambda: psutil.Process(run.pid).status() == psutil.STATUS_ZOMBIE, what="zombie")
    os.waitpid(run.pid, 0)  # a thief: the status is gone for good
    report = _tick_until_done(run)
    assert (report["state"], report["reason"]) == ("lost", EXIT_STATUS_UNKNOWN)
    assert report.get("exit_code") is None
    assert messages.check_report(report, messages.Finished).state == "lost"


def test_collect_exit_status_reaps_only_its_pid(tmp_path: Path) -> None:
    a = subprocess.Popen(["sh", "-c", "exit 3"])
    b = subprocess.Popen(["sh", "-c", "kill -9 $$"])
    try:
        for p in (a, b):
            wait_until(lambda p=p: psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE, what="zombie")
        fd = os.pidfd_open(a.pid)
        try:
            assert collect_exit_status(a.pid, fd) == (True, 3)
        finally:
            os.close(fd)
        assert psutil.Process(b.pid).status() == psutil.STATUS_ZOMBIE  # untouched
        assert collect_exit_status(b.pid) == (True, -signal.SIGKILL)
        assert collect_exit_status(b.pid) == (True, None)  # already collected: unknowable now
    finally:
        a.returncode = b.returncode = -1  # collected above: Popen must not wait on the pids again


def test_kills_never_reap_someone_elses_child() -> None:
    """The daemon kills a dead worker's effects with the same TreeKill while its own worker
    children may have exited unpolled: a kill must leave every exit status to its owner."""
    child = subprocess.Popen(["sh", "-c", "exit 5"])
    try:
        wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, what="zombie")
        unrelated = UlidGenerator().new()
        kill = TreeKill(unrelated, None, grace=0.0)
        kill.start()
        assert kill.poll() is True
        assert kill_tree(unrelated, None, grace=0.0, timeout=2.0) is True
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # still ours to collect
    finally:
        assert child.wait(timeout=5) == 5
