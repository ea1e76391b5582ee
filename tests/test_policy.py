"""The daemon's policies without any I/O (daemon/policy.py, shutdown.py, waits.py): fake clocks,
no processes, no sockets; each test runs in milliseconds."""

from __future__ import annotations

import pytest

from effectd.daemon.core import Worker, WorkerState
from effectd.daemon.policy import (
    CRASH_LOOP_THRESHOLD,
    CRASH_WINDOW,
    SPAWN_BACKOFF_MAX,
    WORKER_START_TIMEOUT,
    Adoption,
    CrashBackoff,
    Loss,
    RecyclePolicy,
    Throttle,
    Unclaimed,
    loss_outcome,
    reported_outcome,
    reported_time,
    silence_verdict,
)
from effectd.daemon.shutdown import REPORT_ALLOWANCE, SHUTDOWN_OVERRUN, WORKER_EXIT_WAIT, DrainAction, Phase, Shutdown
from effectd.daemon.waits import Waiter, WaitOutcome, WaitTable
from effectd.ipc.errors import TooManyWaits
from effectd.ipc.schema import EffectState


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- crash backoff -------------------------------------------------------------------------


def test_crash_backoff_doubles_past_the_threshold_and_is_capped() -> None:
    clock = FakeClock()
    crashes = CrashBackoff(clock)
    delays = [crashes.crashed() for _ in range(CRASH_LOOP_THRESHOLD + 12)]
    assert delays[:CRASH_LOOP_THRESHOLD] == [0.0] * CRASH_LOOP_THRESHOLD
    assert delays[CRASH_LOOP_THRESHOLD:CRASH_LOOP_THRESHOLD + 4] == [0.2, 0.4, 0.8, 1.6]
    assert delays[-1] == SPAWN_BACKOFF_MAX
    assert crashes.failures == CRASH_LOOP_THRESHOLD + 12
    assert not crashes.may_spawn(clock.t)
    assert crashes.remaining() == SPAWN_BACKOFF_MAX
    clock.t += SPAWN_BACKOFF_MAX
    assert crashes.may_spawn(clock.t) and crashes.remaining() == 0.0


def test_crashes_outside_the_window_are_forgotten() -> None:
    clock = FakeClock()
    crashes = CrashBackoff(clock)
    for _ in range(CRASH_LOOP_THRESHOLD):
        crashes.crashed()
        clock.t += 1.0
    assert crashes.recent() == CRASH_LOOP_THRESHOLD
    clock.t += CRASH_WINDOW
    assert crashes.recent() == 0
    assert crashes.crashed() == 0.0  # the old crashes no longer count towards a loop
    assert crashes.failures == CRASH_LOOP_THRESHOLD + 1  # but the total does


# ---- loss -> final state ---------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "cancel_requested", "expected"), [
    (Loss.WORKER_LOST, None, (EffectState.FAILED, "worker_lost")),
    (Loss.WORKER_LOST, "cancelled", (EffectState.CANCELLED, "cancelled")),
    (Loss.WORKER_LOST, "user says stop", (EffectState.CANCELLED, "user says stop")),
    (Loss.WORKER_LOST, "daemon_stopped", (EffectState.LOST, "daemon_stopped")),
    (Loss.DAEMON_STOPPED, "daemon_stopped", (EffectState.LOST, "daemon_stopped")),
    (Loss.DAEMON_STOPPED, None, (EffectState.LOST, "daemon_stopped")),
    (Loss.DAEMON_CRASHED, None, (EffectState.LOST, "daemon_crashed")),
    (Loss.DAEMON_CRASHED, "cancelled", (EffectState.LOST, "daemon_crashed")),
])
def test_each_loss_maps_to_one_final_state(loss: Loss, cancel_requested: str | None,
                                           expected: tuple[EffectState, str]) -> None:
    assert loss_outcome(loss, cancel_requested) == expected
    assert expected[0].final


@pytest.mark.parametrize(("reported", "cancel_requested", "expected"), [
    ((EffectState.SUCCEEDED, None), None, (EffectState.SUCCEEDED, None)),
    ((EffectState.SUCCEEDED, None), "cancelled", (EffectState.SUCCEEDED, None)),  # it finished first
    ((EffectState.FAILED, "exit_code"), None, (EffectState.FAILED, "exit_code")),
    ((EffectState.CANCELLED, "cancelled"), "by user", (EffectState.CANCELLED, "by user")),
    ((EffectState.CANCELLED, "cancelled"), "daemon_stopped", (EffectState.LOST, "daemon_stopped")),
    ((EffectState.TIMED_OUT, "timeout"), "daemon_stopped", (EffectState.TIMED_OUT, "timeout")),
])
def test_a_workers_report_keeps_its_state_except_a_cancel(
        reported: tuple[EffectState, str | None], cancel_requested: str | None,
        expected: tuple[EffectState, str | None]) -> None:
    assert reported_outcome(*reported, cancel_requested) == expected


def test_reported_times_must_be_plausible() -> None:
    assert reported_time(5.0, not_before=1.0, now=10.0) == 5.0
    assert reported_time(10.5, not_before=1.0, now=10.0) == 10.5  # clock granularity
    assert reported_time(12.0, not_before=1.0, now=10.0) is None  # the future
    assert reported_time(0.5, not_before=1.0, now=10.0) is None  # before it was submitted
    for garbage in (float("nan"), float("inf"), "5", None, [5]):
        assert reported_time(garbage, not_before=1.0, now=10.0) is None


# ---- adoption deadlines ----------------------------------------------------------------------


def test_adoption_deadline_outcomes() -> None:
    clock = FakeClock()
    adoption = Adoption(grace=10.0, clock=clock)
    adoption.expect("claimed")
    adoption.expect("unclaimed")
    clock.t += 5.0
    adoption.expect("late")  # recovered later: its own grace
    adoption.settled("claimed")  # a worker reported it
    assert "claimed" not in adoption and len(adoption) == 2
    assert adoption.expired(clock.t + 4.9) == []
    assert adoption.expired(clock.t + 5.0) == ["unclaimed"]
    assert adoption.expired(clock.t + 5.0) == []  # judged once
    assert adoption.expired(clock.t + 10.0) == ["late"]
    assert len(adoption) == 0
    assert Adoption.verdict(never_started=True) is Unclaimed.REQUEUE
    assert Adoption.verdict(never_started=False) is Unclaimed.LOSE


# ---- liveness --------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "silent", "expected"), [
    (WorkerState.STARTING, WORKER_START_TIMEOUT - 1, None),
    (WorkerState.STARTING, WORKER_START_TIMEOUT + 1, "never became ready"),
    (WorkerState.READY, 2.9, None),
    (WorkerState.READY, 3.5, "silent for 3.5s"),
    (WorkerState.STOPPING, 3.5, "silent for 3.5s"),
    (WorkerState.DEAD, 1000.0, None),
])
def test_silence_verdict(state: WorkerState, silent: float, expected: str | None) -> None:
    assert silence_verdict(Worker(id="w", state=state), silent, liveness=3.0) == expected


# ---- recycling -------------------------------------------------------------------------------


def test_recycling_retires_only_idle_ready_workers() -> None:
    policy = RecyclePolicy(idle_timeout=60.0, max_effects=10, max_rss=1000)
    rss = {1: 10, 2: 5000, 3: 10, 4: 5000, 5: 5000}
    spent = Worker(id="spent", pid=1, state=WorkerState.READY, effects_done=10)
    fat = Worker(id="fat", pid=2, state=WorkerState.READY)
    fine = Worker(id="fine", pid=3, state=WorkerState.READY, effects_done=9)
    busy = Worker(id="busy", pid=4, state=WorkerState.READY, effects={"e"}, effects_done=50)
    stopping = Worker(id="stopping", pid=5, state=WorkerState.STOPPING, effects_done=50)
    idle = Worker(id="idle", pid=3, state=WorkerState.READY, effects_done=10)
    workers = [spent, fat, fine, busy, stopping, idle]
    decided = policy.to_retire([idle], workers, rss.__getitem__)
    assert [(w.id, why) for w, why in decided] == [
        ("idle", "idle"), ("spent", "max_effects_per_worker"), ("fat", "max_worker_rss")]
    # Between RSS checks only the counters are compared.
    assert [(w.id, why) for w, why in policy.to_retire([], workers, None)] == [
        ("spent", "max_effects_per_worker"), ("idle", "max_effects_per_worker")]
    assert RecyclePolicy(idle_timeout=60.0).to_retire([], workers, rss.__getitem__) == []  # 0: never


def test_throttle() -> None:
    throttle = Throttle(0.5)
    assert throttle.due(100.0)
    assert not throttle.due(100.4)
    assert throttle.due(100.5)


# ---- drain phases ----------------------------------------------------------------------------


def test_drain_interrupts_then_kills_then_retires_then_stops() -> None:
    clock = FakeClock()
    sd = Shutdown(drain_timeout=30.0, kill_grace=5.0, clock=clock)
    assert not sd.draining  # Phase.SERVING
    assert sd.step(clock.t, running=True, killing=False, workers_left=True) == []
    assert sd.begin(drain=True) == clock.t + 30.0  # waits are answered by then
    assert sd.begin(drain=True) is None  # already shutting down
    assert sd.phase is Phase.DRAINING and sd.draining
    assert sd.step(clock.t + 29.9, running=True, killing=False, workers_left=True) == []
    t = clock.t + 30.0
    assert sd.step(t, running=True, killing=False, workers_left=True) == [DrainAction.INTERRUPT]
    assert sd.phase is Phase.INTERRUPTING
    assert sd.step(t + 5.0 + REPORT_ALLOWANCE - 0.1, running=True, killing=False, workers_left=True) == []
    t += 5.0 + REPORT_ALLOWANCE
    assert sd.step(t, running=True, killing=True, workers_left=True) == [DrainAction.KILL]
    assert sd.phase is Phase.KILLING
    assert sd.step(t + 1, running=False, killing=True, workers_left=True) == []
    assert sd.step(t + 2, running=False, killing=False, workers_left=True) == [DrainAction.RETIRE_WORKERS]
    assert sd.phase is Phase.RETIRING
    assert sd.step(t + 3, running=False, killing=False, workers_left=False) == [
        DrainAction.RETIRE_WORKERS, DrainAction.STOP]
    assert sd.phase is Phase.STOPPED
    assert sd.step(t + 4, running=False, killing=False, workers_left=False) == []


def test_drain_with_nothing_running_retires_at_once_and_waits_for_workers_a_while() -> None:
    clock = FakeClock()
    sd = Shutdown(drain_timeout=30.0, kill_grace=5.0, clock=clock)
    sd.begin(drain=True)
    assert sd.step(clock.t, running=False, killing=False, workers_left=True) == [DrainAction.RETIRE_WORKERS]
    late = clock.t + 30.0 + WORKER_EXIT_WAIT + 0.1  # workers that ignore stop: close() kills them
    assert sd.step(late, running=False, killing=False, workers_left=True) == [
        DrainAction.RETIRE_WORKERS, DrainAction.STOP]


def test_a_second_request_without_drain_interrupts_now() -> None:
    clock = FakeClock()
    sd = Shutdown(drain_timeout=30.0, kill_grace=5.0, clock=clock)
    sd.begin(drain=True)
    clock.t += 1.0
    assert sd.begin(drain=False) is None
    assert sd.stop_now and sd.deadline == clock.t
    assert sd.step(clock.t, running=True, killing=False, workers_left=True) == [DrainAction.INTERRUPT]


def test_shutdown_without_drain_has_its_deadline_now() -> None:
    clock = FakeClock()
    sd = Shutdown(drain_timeout=30.0, kill_grace=5.0, clock=clock)
    assert sd.begin(drain=False) == clock.t


def test_a_shutdown_that_cannot_conclude_overruns() -> None:
    clock = FakeClock()
    sd = Shutdown(drain_timeout=30.0, kill_grace=5.0, clock=clock)
    sd.begin(drain=True)
    end = clock.t + 30.0 + 5.0 + SHUTDOWN_OVERRUN
    assert DrainAction.ABANDON not in sd.step(end, running=True, killing=True, workers_left=True)
    assert sd.step(end + 0.1, running=True, killing=True, workers_left=True) == [DrainAction.ABANDON]
    assert sd.phase is Phase.OVERRUN
    assert sd.step(end + 1, running=True, killing=True, workers_left=True) == []


# ---- wait table ------------------------------------------------------------------------------


def waiter(ids: list[str], first: bool = False, deadline: float = 100.0, pending: set[str] | None = None) -> Waiter:
    return Waiter(b"client", "rid", ids, first, deadline, set(ids) if pending is None else pending)


def test_wait_all_wakes_when_the_last_effect_is_final() -> None:
    table = WaitTable(limit=10)
    w = waiter(["a", "b", "b"])  # a repeated id counts once
    table.park(w)
    table.effect_final("a")
    assert table.due(now=0.0) == []
    table.effect_final("c")  # not waited on
    table.effect_final("b")
    assert table.due(now=0.0) == [w] and w.outcome is WaitOutcome.DONE
    assert len(table) == 0 and table.due(now=1000.0) == []


def test_wait_any_wakes_at_the_first_final_effect_only_its_own_waits() -> None:
    table = WaitTable(limit=10)
    on_a, on_b = waiter(["a", "x"], first=True), waiter(["b", "x"], first=True)
    table.park(on_a)
    table.park(on_b)
    table.effect_final("a")
    assert table.due(now=0.0) == [on_a] and on_a.outcome is WaitOutcome.DONE
    assert len(table) == 1
    table.effect_final("x")
    assert table.due(now=0.0) == [on_b]


def test_waits_time_out_at_their_deadline_and_shutdown_caps_them() -> None:
    table = WaitTable(limit=10)
    soon, later = waiter(["a"], deadline=5.0), waiter(["a"], deadline=50.0)
    table.park(soon)
    table.park(later)
    assert table.next_deadline() == 5.0
    assert table.due(now=4.9) == []
    assert table.due(now=5.0) == [soon] and soon.outcome is WaitOutcome.TIMED_OUT
    table.cap_deadlines(20.0)
    assert table.next_deadline() == 20.0
    assert table.due(now=20.0) == [later]
    assert table.next_deadline() == float("inf")


def test_gc_wakes_a_wait_at_once_with_not_found() -> None:
    table = WaitTable(limit=10)
    # Parked on [done, running]: gc can only delete the final one.
    w = waiter(["done", "running"], pending={"running"})
    table.park(w)
    table.effects_deleted(["unrelated"])
    assert table.due(now=0.0) == []
    table.effects_deleted(["done"])
    assert table.due(now=0.0) == [w]
    assert w.outcome is WaitOutcome.NOT_FOUND and w.gone == {"done"}


def test_the_wait_table_is_bounded_and_empties_on_stop() -> None:
    table = WaitTable(limit=2)
    table.park(waiter(["a"]))
    table.park(waiter(["b"]))
    with pytest.raises(TooManyWaits, match="2 waits are parked"):
        table.park(waiter(["c"]))
    assert len(table.take_all()) == 2
    assert len(table) == 0
    table.effect_final("a")  # no index left behind
    assert table.due(now=1000.0) == []


# ---- the glue depends on the core, not the other way round -------------------------------------


def test_handlers_and_core_modules_do_not_import_the_loop() -> None:
    """requests.py and intake.py see the daemon through host.Host; the policy modules import
    no I/O module at all (not even under TYPE_CHECKING)."""
    import ast
    import pathlib

    daemon_dir = pathlib.Path(__file__).resolve().parent.parent / "effectd" / "daemon"
    forbidden = {
        "requests": {"server", "supervisor"},
        "intake": {"server", "supervisor", "requests"},
        "host": {"server", "supervisor", "requests", "intake"},
        "policy": {"server", "supervisor", "pool", "proctree", "sockets", "outbox"},
        "shutdown": {"server", "supervisor", "pool", "proctree", "sockets", "outbox"},
        "waits": {"server", "supervisor", "pool", "proctree", "sockets", "outbox"},
    }
    for module, banned in forbidden.items():
        tree = ast.parse((daemon_dir / f"{module}.py").read_text())
        imported = {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("effectd.daemon")}
        assert not imported & banned, (module, imported & banned)
