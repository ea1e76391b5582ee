"""One daemon per journal: the state dir is locked for the daemon's whole life.

Two runtime dirs on one state dir must never give two daemons (effects would run twice and a
final state would be overwritten); a daemon whose runtime dir vanishes (logind at logout,
tmpfiles) restores its sockets, and clients whose runtime dir is empty find the live daemon
through the state dir instead of starting a second one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from effectd.client import Client, EffectState
from tests.conftest import DaemonHandle, daemons_using, wait_until

EXIT_ALREADY_RUNNING = 75


def daemons_on(state: Path) -> list[psutil.Process]:
    """Live effectd daemons using ``state`` (by argument or environment)."""
    return daemons_using("--state-dir", "EFFECTD_STATE_DIR", state)


def stop_extra_daemons(state: Path, keep: int) -> list[int]:
    """Stop daemons on ``state`` other than ``keep`` (only ever found on broken code); their pids."""
    extra = [p for p in daemons_on(state) if p.pid != keep]
    for p in extra:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGTERM)  # the second one: stop at once
    _, alive = psutil.wait_procs(extra, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return [p.pid for p in extra]


def final_events(state: Path) -> dict[str, int]:
    """Effect id -> number of ``finished`` records in the journal's events table."""
    con = sqlite3.connect(f"file:{state / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT effect_id, COUNT(*) FROM events WHERE type = 'finished' "
                           "GROUP BY effect_id").fetchall()
    finally:
        con.close()
    return {eid: n for eid, n in rows}


def second_on_same_state(daemon_factory: Any, first: DaemonHandle, *args: str) -> DaemonHandle:
    """A daemon handle with its own runtime dir but ``first``'s state dir (not started)."""
    d: DaemonHandle = daemon_factory(*args, start=False)
    d.state = first.state
    d.env["EFFECTD_STATE_DIR"] = str(first.state)
    return d


def answering_pid(runtime: Path, state: Path) -> int | None:
    with contextlib.suppress(Exception), Client(runtime, state=state, autostart=False, timeout=0.5, retries=0) as c:
        return int(c.hello()["pid"])
    return None


@pytest.mark.slow
def test_second_runtime_dir_on_one_state_dir_exits_75_and_every_effect_ends_once(
        daemon_factory: Any, tmp_path: Path) -> None:
    first = daemon_factory("--kill-grace", "1")
    c = first.client()
    ran = tmp_path / "ran"
    # Long enough that the second daemon (adopt grace 0.5 s) would give them up as crashed.
    ids = [c.submit_shell(f"echo {i} >> {ran}; sleep 2") for i in range(8)]
    wait_until(lambda: all(r.state is EffectState.RUNNING for r in c.status_many(ids)), what="all running")
    second = second_on_same_state(daemon_factory, first, "--adopt-grace", "0.5", "--kill-grace", "1")
    second.start(wait=False)
    assert second.proc is not None
    with contextlib.suppress(subprocess.TimeoutExpired):
        second.proc.wait(10)
    second_status = second.proc.poll()
    records = list(c.as_completed(ids, timeout=30))
    stopped = stop_extra_daemons(first.state, keep=first.pid)
    finals = final_events(first.state)
    runs = ran.read_text().split()
    problems = []
    twice = sorted(eid for eid in ids if finals.get(eid, 0) != 1)
    if twice:
        problems.append(f"{len(twice)}/{len(ids)} effects have != 1 final event: "
                        f"{[finals.get(e, 0) for e in twice]}")
    if len(runs) != len(ids):
        problems.append(f"{len(runs)} runs for {len(ids)} effects")
    not_ok = [(r.state.value, r.reason) for r in records if r.state is not EffectState.SUCCEEDED]
    if not_ok:
        problems.append(f"{len(not_ok)}/{len(ids)} not succeeded: {not_ok[:3]}")
    if second_status != EXIT_ALREADY_RUNNING:
        problems.append(f"second daemon status {second_status} (stopped extra daemons {stopped})")
    else:
        log = second.log()
        if str(first.pid) not in log or str(first.runtime) not in log:
            problems.append(f"exit message does not name pid {first.pid} and {first.runtime}: {log[-500:]}")
    assert not problems, problems


@pytest.mark.slow
def test_removed_runtime_dir_is_restored_and_clients_find_the_live_daemon(daemon_factory: Any) -> None:
    d = daemon_factory("--kill-grace", "1", "--heartbeat", "0.5")
    c = d.client()
    before = c.submit_shell("sleep 2; echo done")
    wait_until(lambda: c.status(before).state is EffectState.RUNNING, what="the effect to start")
    shutil.rmtree(d.runtime)
    other = d.root / "run2"  # e.g. a cron session without XDG_RUNTIME_DIR: another runtime dir
    try:
        # The daemon restores its sockets within a few seconds (no client involved).
        wait_until(lambda: answering_pid(d.runtime, d.state) == d.pid, timeout=5,
                   what="the daemon to answer on its restored runtime dir")
        with Client(other, state=d.state, autostart=True, timeout=2) as c2:
            assert c2.hello()["pid"] == d.pid
            after = c2.submit_shell("echo after")
            assert c2.wait(after, timeout=20).state is EffectState.SUCCEEDED
        cli = subprocess.run([sys.executable, "-m", "effectd.cli", "daemon", "start", "--json"],
                             env={**d.env, "EFFECTD_RUNTIME_DIR": str(other)}, capture_output=True,
                             timeout=30, stdin=subprocess.DEVNULL)
        assert cli.returncode == 0, cli.stderr
        assert f'"pid": {d.pid}' in cli.stdout.decode(), cli.stdout
        rec = c.wait(before, timeout=20)
        assert (rec.state, c.output(before)) == (EffectState.SUCCEEDED, b"done\n"), (rec, d.log())
        assert [p.pid for p in daemons_on(d.state)] == [d.pid]
        assert (d.runtime.stat().st_mode & 0o777) == 0o700
    finally:
        extra = stop_extra_daemons(d.state, keep=d.pid)
        for p in psutil.process_iter(["cmdline"]):  # workers of a second daemon, if one started
            with contextlib.suppress(psutil.Error):
                if str(other) in (p.info.get("cmdline") or []):
                    p.kill()
        shutil.rmtree(other, ignore_errors=True)
    assert not extra, f"a second daemon was started on the same state dir: {extra}"
    assert set(final_events(d.state).values()) == {1}


@pytest.mark.slow
def test_removed_runtime_dir_does_not_make_a_client_start_a_second_daemon(daemon_factory: Any) -> None:
    """Without waiting for the restore: a client on the vanished runtime dir waits for the live
    daemon (found through the state dir) instead of autostarting another one."""
    d = daemon_factory("--kill-grace", "1")
    shutil.rmtree(d.runtime)
    try:
        with Client(d.runtime, state=d.state, autostart=True, timeout=2) as c:
            assert c.hello()["pid"] == d.pid
    finally:
        extra = stop_extra_daemons(d.state, keep=d.pid)
    assert not extra, f"a second daemon was started on the same state dir: {extra}"


@pytest.mark.slow
def test_a_final_state_is_written_once_even_by_two_daemons_on_one_journal(daemon_factory: Any) -> None:
    """Force two daemons onto one journal, on two runtime dirs: the first one's lock file is
    replaced by one this test holds until the first daemon notices, then the second daemon
    takes it. Both conclude the same running effects - the first from its workers' reports,
    the second by giving them up as lost - and the journal takes only one final state of
    each. The first daemon, having lost the journal, drains and stops."""
    first = daemon_factory("--kill-grace", "1")
    c = first.client()
    ids = [c.submit_shell("sleep 10") for _ in range(8)]
    wait_until(lambda: all(r.state is EffectState.RUNNING for r in c.status_many(ids)), what="all running")
    lock_file = first.state / "daemon.json"
    lock_file.unlink()
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        wait_until(lambda: "lost the journal's lock" in first.log(), timeout=10,
                   what="the first daemon to notice it lost the journal")
    finally:
        os.close(fd)
    second = second_on_same_state(daemon_factory, first, "--adopt-grace", "0.2", "--kill-grace", "1")
    second.start(wait=False)
    wait_until(lambda: len(final_events(first.state)) == len(ids), timeout=30, what="every effect final")
    assert first.proc is not None
    try:
        first.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the first daemon did not stop:\n{first.log()}") from None

    def refusals() -> int:  # each effect is concluded by both daemons: one of them is refused
        return first.log().count("refused to record effect") + second.log().count("refused to record effect")

    with contextlib.suppress(AssertionError):  # checked below, with the figures
        wait_until(lambda: refusals() >= len(ids), timeout=15, what="both daemons to conclude every effect")
    finals = final_events(first.state)
    assert [finals[eid] for eid in ids] == [1] * len(ids), (finals, first.log()[-3000:], second.log()[-3000:])
    assert refusals() == len(ids)
