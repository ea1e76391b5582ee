"""What a crash, a gc or a lost journal may not do: run acknowledged work twice, drop it, or
misreport its times (issue 13 items 4, 5, 7; issue 14 item 4). Real daemons, real workers,
real ``kill -9``; nothing is mocked.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from effectd.client import EffectState
from effectd.daemon.core import NEVER_STARTED, Effect, Limits, Scheduler, Worker, WorkerState
from effectd.daemon.retention import Retention
from effectd.ipc.constants import MIN_KEY_WINDOW_DAYS
from effectd.ipc.errors import EffectdError
from effectd.journal import Journal, OutputStore
from effectd.journal.outputs import claim_attempt
from effectd.journal.store import JOURNAL_SUFFIXES
from tests.conftest import wait_until

# ---- 13.5 idempotency keys outlive gc ----------------------------------------------------------

TRUE = {"kind": "shell", "command": "true"}


@pytest.mark.slow
def test_resubmit_with_key_after_gc_is_refused_not_rerun(daemon: Any) -> None:
    c = daemon.client()
    first = c.submit(TRUE, request_key="key-after-gc")
    assert c.wait(first, timeout=20).state is EffectState.SUCCEEDED
    batch = c.submit_many([TRUE] * 2, request_key="batch-after-gc")
    c.wait_many(batch, timeout=20)
    # Inside the window and before gc, a resend returns the original ids.
    assert c.submit(TRUE, request_key="key-after-gc") == first
    assert c.gc(retain_count=0)["removed"] == 3
    for key, resend in (("key-after-gc", lambda k: c.submit(TRUE, request_key=k)),
                        ("batch-after-gc", lambda k: c.submit_many([TRUE], request_key=k))):
        with pytest.raises(EffectdError) as exc:
            resend(key)
        assert exc.value.code == "gone", exc.value
        assert f"request_key {key} was used for effects that have been garbage-collected" in exc.value.message
    assert c.list(limit=10) == []  # no second run


@pytest.mark.slow
def test_record_spec_has_no_request_key_and_resubmits_verbatim(daemon: Any) -> None:
    c = daemon.client()
    eid = c.submit({"kind": "shell", "command": "echo hi"}, request_key="spec-key")
    rec = c.wait(eid, timeout=20)
    full = c.status(eid)
    assert "request_key" not in full.spec and "request_key" not in rec.spec
    again = c.submit(full.spec)  # the stored spec is a valid submit as it stands
    assert c.wait(again, timeout=20).state is EffectState.SUCCEEDED
    assert c.output(again) == b"hi\n"


def test_request_keys_are_pruned_only_after_the_window(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        retention = Retention(journal, OutputStore(tmp_path / "outputs"), retain_days=1.0)
        day = 86400.0
        now = time.time()
        journal.put_request_key("fresh", ["A"], created=now - (MIN_KEY_WINDOW_DAYS - 1) * day)
        journal.put_request_key("stale", ["B"], created=now - (MIN_KEY_WINDOW_DAYS + 1) * day)
        journal.commit()
        retention.collect()
        journal.commit()
        assert journal.ids_for_request_key("fresh") == ["A"]
        assert journal.ids_for_request_key("stale") is None
        assert Retention(journal, OutputStore(tmp_path / "outputs"), retain_days=30.0).key_window_days == 30.0
    finally:
        journal.close()


def test_v1_journal_is_migrated_keys_kept_and_specs_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    # Make it what effectd wrote before schema 2: no key creation time, the key inside the spec.
    record = {"id": "A" * 26, "state": "succeeded", "submitted_at": 1.0,
              "spec": {"kind": "shell", "command": "true", "request_key": "old-key"}}
    con = sqlite3.connect(path)
    with con:
        con.execute("ALTER TABLE request_keys DROP COLUMN created")
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (msgpack.packb(1),))
        con.execute("INSERT INTO request_keys VALUES (?, ?)", ("old-key", msgpack.packb(["A" * 26])))
        con.execute("INSERT INTO effects (id, state, submitted_at, record) VALUES (?, ?, ?, ?)",
                    ("A" * 26, "succeeded", 1.0, msgpack.packb(record)))
    con.close()
    journal = Journal(path)
    try:
        assert journal.get_meta("schema_version") == 2
        assert journal.ids_for_request_key("old-key") == ["A" * 26]
        assert journal.get("A" * 26)["spec"] == {"kind": "shell", "command": "true"}  # type: ignore[index]
        journal.prune_request_keys(time.time() - MIN_KEY_WINDOW_DAYS * 86400)
        assert journal.ids_for_request_key("old-key") == ["A" * 26]  # a full window from the upgrade
    finally:
        journal.close()


# ---- 13.7 times tell the truth -----------------------------------------------------------------

GAP = 3.0
"""Seconds with no daemon after the effect ended: the scenario itself, not a synchronisation."""


@pytest.mark.slow
def test_effect_finished_while_daemon_down_keeps_its_own_times(daemon_factory: Any) -> None:
    d = daemon_factory("--adopt-grace", "20")
    c = d.client()
    eid = c.submit_shell("sleep 1")
    wait_until(lambda: c.status(eid).pid, what="started record")  # the worker's start is journaled
    d.kill9()
    # The effect ends by itself while no daemon runs: its process disappears.
    wait_until(lambda: not d.effect_processes({eid}), what="effect process gone")
    time.sleep(GAP)
    restarted = time.time()
    d.start()
    rec = d.client().wait(eid, timeout=30)
    assert rec.state is EffectState.SUCCEEDED, (rec.state, rec.reason)
    assert rec.started_at is not None and rec.finished_at is not None
    assert 0.9 <= rec.finished_at - rec.started_at < 1.0 + GAP / 2, rec.finished_at - rec.started_at
    assert rec.finished_at < restarted
    assert rec.attempts == [] or rec.attempts[-1]["finished_at"] == rec.finished_at


# ---- 14.4 a deleted or replaced journal --------------------------------------------------------


def _delete_journal(state: Path) -> None:
    for suffix in JOURNAL_SUFFIXES:
        (state / f"journal.sqlite3{suffix}").unlink()


def _replace_journal(state: Path) -> None:
    """What restoring a backup by rename looks like: a consistent copy renamed over the file."""
    path = state / "journal.sqlite3"
    copy = state / "restored.sqlite3"
    src, dst = sqlite3.connect(path), sqlite3.connect(copy)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    os.rename(copy, path)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_delete_journal, _replace_journal], ids=["deleted", "replaced"])
def test_lost_journal_stops_acknowledgements_and_exits_nonzero(daemon_factory: Any, damage: Any) -> None:
    d = daemon_factory()
    c = d.client(timeout=1.0, retries=0)
    before = c.submit_shell("true")
    c.wait(before, timeout=20)
    damage(d.state)
    acked, refused = [], []
    assert d.proc is not None
    for _ in range(10):
        if d.proc.poll() is not None:
            break
        try:
            acked.append(c.submit_shell("true"))
        except EffectdError as exc:
            refused.append(exc.code)
    assert d.proc.wait(20) == 74, d.log()
    assert refused[0] == "journal_lost", (refused, d.log())
    d.start()  # what systemd's Restart=on-failure does
    c2 = d.client()
    missing = [eid for eid in acked if eid not in d.effect_ids()]
    assert not missing, f"{len(missing)}/{len(acked)} acknowledged submits lost after the restart"
    if damage is _replace_journal:  # the restored journal is the one in use now
        assert c2.status(before).state is EffectState.SUCCEEDED
    assert c2.wait(c2.submit_shell("true"), timeout=20).state is EffectState.SUCCEEDED


def test_systemd_units_restart_on_the_journal_lost_exit_status() -> None:
    for unit in ("effectd.service", "effectd@.service"):
        text = (Path(__file__).resolve().parent.parent / "systemd" / unit).read_text()
        settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
        assert settings.get("Restart") in ("on-failure", "always"), unit
        for key in ("RestartPreventExitStatus", "SuccessExitStatus"):
            assert "74" not in settings.get(key, "").split(), (unit, key)


# ---- 13.4 effects that never started are not lost by a crash -----------------------------------

UNSTARTED_COUNT = 20


def _runs(runs: Path, eid: str) -> int:
    try:
        return len((runs / eid).read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_assigned_but_never_started_effects_run_exactly_once_after_a_crash(daemon_factory: Any,
                                                                           tmp_path: Path) -> None:
    """The worker is SIGSTOPped, so assignments journaled just before the kill -9 sit unread in
    its socket; after the restart they must run once (not end ``lost``), and when the old worker
    wakes up and reads those stale assignments it must not run them a second time. An effect
    that had started is ``lost`` and never re-run."""
    runs = tmp_path / "runs"
    runs.mkdir()
    count = f"echo run >> {runs}/$EFFECTD_EFFECT_ID"
    # Heartbeat 5 s: the daemon would call the stopped worker lost only after 15 s.
    d = daemon_factory("--heartbeat", "5", "--adopt-grace", "1", "--kill-grace", "1", "--parallel", "64")
    c = d.client()
    started = c.submit_shell(f"{count}; exec sleep 60")
    wait_until(lambda: c.status(started).pid and _runs(runs, started), what="started effect journaled")
    (old_worker,) = d.worker_processes()
    old_worker.suspend()
    try:
        ids = c.submit_many([{"kind": "shell", "command": count}] * UNSTARTED_COUNT)
        wait_until(lambda: all(r.state is EffectState.RUNNING for r in c.status_many(ids)), what="assigned")
        d.kill9()
        d.start()
        c2 = d.client()
        records = c2.wait_many(ids, timeout=30)
        lost = [r for r in records if r.state is not EffectState.SUCCEEDED]
        assert not lost, f"{len(lost)}/{len(ids)} never-started effects not run: {lost[0].state} {lost[0].reason}"
        rec = c2.wait(started, timeout=30)
        assert (rec.state, rec.reason) == (EffectState.LOST, "daemon_crashed")
    finally:
        old_worker.resume()
    # The old worker reads the stale assignments, then re-registers with the new daemon.
    wait_until(lambda: any(w["pid"] == old_worker.pid for w in c2.hello()["workers"]), timeout=30,
               what="old worker back")
    assert {eid: _runs(runs, eid) for eid in ids} == {eid: 1 for eid in ids}
    assert _runs(runs, started) == 1
    # It did read them (so the race was really run), and refused each one.
    log = d.log_path.read_text(errors="replace")
    assert sum(f"refusing assignment of {eid}" in log for eid in ids) == UNSTARTED_COUNT
    assert all(r.attempt == 2 and r.attempts[0]["reason"] == "never_started" for r in c2.status_many(ids))


def test_a_voided_attempt_does_not_use_up_a_retry() -> None:
    sched = Scheduler(Limits())
    eff = Effect(id="0" * 26, spec={"kind": "shell", "command": "true", "retries": 1}, submitted_at=0.0)
    worker = Worker(id="w", state=WorkerState.READY)
    sched.add(eff)
    sched.add_worker(worker)
    sched.start(eff, worker, 1.0)
    sched.requeue_unstarted(eff, 2.0)
    assert (eff.state, eff.attempt, eff.attempts[0]["reason"]) == (EffectState.QUEUED, 1, NEVER_STARTED)
    sched.start(eff, worker, 3.0)
    assert eff.attempt == 2
    assert sched.conclude(eff, EffectState.FAILED, 4.0) is False  # its one retry is still there
    sched.start(eff, worker, 5.0)
    assert sched.conclude(eff, EffectState.FAILED, 6.0) is True


def test_claim_fence_admits_exactly_one_of_worker_and_daemon(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    store.prepare("A")
    claim_attempt(tmp_path / "A", 1, "w-1 123")
    assert store.void_attempt("A", 1) is False  # the worker was first: it may have started
    assert store.void_attempt("A", 2) is True
    assert store.void_attempt("A", 2) is True  # an earlier daemon's void is recognised
    with pytest.raises(FileExistsError):
        claim_attempt(tmp_path / "A", 2, "w-1 123")  # a stale assignment of a voided attempt
    with pytest.raises(FileNotFoundError):
        claim_attempt(tmp_path / "collected", 1, "w-1 123")  # never recreates a collected effect
    assert sorted(p.name for p in (tmp_path / "A").iterdir()) == [".claim-1", ".claim-2"]
