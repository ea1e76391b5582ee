"""The deciding core without any I/O: state machine, scheduling, placement, retries."""

from __future__ import annotations

import random

import pytest

from effectd.daemon.core import Effect, Limits, Scheduler, Worker, WorkerState
from effectd.ipc.errors import InvalidState
from effectd.ipc.schema import EffectState

_counter = iter(range(10**9))


def eff(kind: str = "shell", **spec: object) -> Effect:
    n = next(_counter)
    base: dict[str, object] = {"kind": kind}
    if kind == "shell":
        base["argv"] = ["true"]
    elif kind == "python":
        base["target"] = "m:f"
    else:
        base["seconds"] = 1
    base.update(spec)
    return Effect(id=f"{n:026d}", spec=base, submitted_at=0.0)


def ready_worker(sched: Scheduler, wid: str, slots: int = 4) -> Worker:
    w = Worker(id=wid, state=WorkerState.READY, slots=slots)
    sched.add_worker(w)
    return w


def no_deps(_: str) -> EffectState | None:
    return None


def test_final_states_never_change() -> None:
    e = eff()
    e.transition(EffectState.RUNNING)
    e.transition(EffectState.SUCCEEDED)
    for new in EffectState:
        with pytest.raises(InvalidState):
            e.transition(new)


def test_parallel_limit_priorities_and_fifo() -> None:
    s = Scheduler(Limits(parallel=2, max_workers=1, min_workers=1))
    ready_worker(s, "w1", slots=10)
    low, a, high, b = eff(priority=-1), eff(), eff(priority=5), eff()
    for e in (low, a, high, b):
        s.add(e)
    assigned, failed, spawn = s.plan(0.0, no_deps)
    assert [e for e, _ in assigned] == [high, a]
    assert not failed and spawn == 0


def test_python_effects_get_a_worker_each_and_spawn_is_requested() -> None:
    s = Scheduler(Limits(parallel=8, max_workers=3, min_workers=1))
    w = ready_worker(s, "w1")
    p1, p2, sh = eff("python"), eff("python"), eff("shell")
    for e in (p1, p2, sh):
        s.add(e)
    assigned, _, spawn = s.plan(0.0, no_deps)
    assert [(e, wk.id) for e, wk in assigned] == [(p1, "w1")]
    assert w.python_effect == p1.id
    assert spawn == 2  # one for the second python effect, one for the shell effect


def test_group_limit_skips_without_blocking_other_groups() -> None:
    s = Scheduler(Limits(parallel=10, max_workers=1, min_workers=1, group_limits={"g": 1}))
    ready_worker(s, "w1", slots=10)
    g1, g2, other = eff(group="g"), eff(group="g"), eff(group="h")
    for e in (g1, g2, other):
        s.add(e)
    assigned, _, _ = s.plan(0.0, no_deps)
    assert [e for e, _ in assigned] == [g1, other]


def test_sleeps_do_not_count_against_parallel() -> None:
    s = Scheduler(Limits(parallel=1, max_workers=1, min_workers=1))
    ready_worker(s, "w1", slots=10)
    effects = [eff("sleep"), eff("sleep"), eff("shell"), eff("shell")]
    for e in effects:
        s.add(e)
    assigned, _, _ = s.plan(0.0, no_deps)
    assert [e for e, _ in assigned] == effects[:3]


def test_dependencies_wait_run_or_fail() -> None:
    s = Scheduler(Limits(parallel=10))
    ready_worker(s, "w1", slots=10)
    dep = eff()
    waiting = eff(after=[dep.id])
    s.add(dep)
    s.add(waiting)
    assigned, failed, _ = s.plan(0.0, no_deps)
    assert [e for e, _ in assigned] == [dep] and not failed
    for e, w in assigned:
        s.start(e, w, 0.0)
    assert s.conclude(dep, EffectState.FAILED, 1.0)
    states = {dep.id: EffectState.FAILED}
    _, failed, _ = s.plan(1.0, states.get)
    assert failed == [waiting]


def test_retry_backoff_requeues_with_jitter_and_keeps_attempts() -> None:
    s = Scheduler(Limits(parallel=10), rng=random.Random(1))
    w = ready_worker(s, "w1")
    e = eff(retries=2, retry_backoff=1.0)
    s.add(e)
    s.start(e, w, 10.0)
    assert s.conclude(e, EffectState.FAILED, 11.0, reason="exit code 1") is False
    assert e.state is EffectState.QUEUED and 11.5 <= e.not_before <= 12.0
    assigned, _, _ = s.plan(11.0, no_deps)
    assert not assigned  # not before its backoff
    s.start(e, w, 20.0)
    assert s.conclude(e, EffectState.TIMED_OUT, 21.0) is False
    assert 22.0 <= e.not_before <= 23.0  # doubled
    s.start(e, w, 30.0)
    assert s.conclude(e, EffectState.LOST, 31.0, reason="daemon_crashed") is True
    assert [a["state"] for a in e.attempts] == ["failed", "timed_out", "lost"]


def test_cancelled_effects_are_not_retried() -> None:
    s = Scheduler(Limits(parallel=10))
    w = ready_worker(s, "w1")
    e = eff(retries=3)
    s.add(e)
    s.start(e, w, 0.0)
    e.cancel_requested = "cancelled"
    assert s.conclude(e, EffectState.FAILED, 1.0) is True


def test_idle_workers_above_minimum_retire() -> None:
    clock = [100.0]
    s = Scheduler(Limits(min_workers=1), monotonic=lambda: clock[0])
    for wid in ("a", "b", "c"):
        ready_worker(s, wid).idle_since = 100.0
    clock[0] = 200.0
    assert len(s.idle_workers_to_retire(200.0, idle_timeout=60.0)) == 2


def test_backoff_index_follows_the_retry_lifecycle() -> None:
    # The loop sleeps until next_retry_at(); a started attempt must not keep it awake.
    s = Scheduler(Limits(parallel=10), rng=random.Random(2))
    w = ready_worker(s, "w1")
    e = eff(retries=1, retry_backoff=1.0)
    s.add(e)
    assert s.next_retry_at() is None
    s.start(e, w, 0.0)
    s.conclude(e, EffectState.FAILED, 1.0)
    assert s.next_retry_at() == e.not_before
    s.start(e, w, 5.0)
    assert s.next_retry_at() is None
    restored = Effect.from_record({**e.to_record(), "state": "queued"})
    s.effects[restored.id] = restored
    s.reindex_backoffs()
    assert s.next_retry_at() == e.not_before
