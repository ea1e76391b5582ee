"""effectd.babysitter.driver (``effectctl babysitter drive``) against the real babysitter SDK
(@a5c-ai/babysitter-sdk 0.0.187) and a real effectd daemon.

Pipelining across phases with 0.0.187: a branch of several sequential ``ctx.task`` calls inside
``ctx.parallel.all`` shifts the replay step ids of the branches *after* it (the SDK then
re-requests their pending task as a duplicate, see ``two_phase_pipelined.mjs``). Branches before
it are not shifted, so a process may pipeline when the multi-step chain is the *last* thunk of its
``ctx.parallel.all`` and the branches before it are single tasks (``TAIL_CHAIN`` below): the next
step of the chain is requested as soon as the previous one is posted, while the slow sibling
still runs. A ``ctx.task`` promise that is not awaited before the next ``ctx.task`` (a floating
promise) is *not* a way out: it makes the SDK append two journal events with the same sequence
number ("Journal sequence gap detected"), which breaks the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from effectd.babysitter import (
    EXIT_WAITING,
    BabysitterCli,
    DriveEvent,
    Driver,
    DriveResult,
    read_journal,
    requested_effect_ids,
    resolved_effect_ids,
)
from tests.conftest import DaemonHandle, wait_until

TAIL_CHAIN = """\
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command, timeout: 30000 },
}));

export async function process(inputs, ctx) {
  const step = (name, command) => ctx.task(shellStep, { title: name, command }, { label: name });
  const [slow, chain] = await ctx.parallel.all([
    () => step("slow", `sleep ${inputs.slow} && echo slow`),
    async () => {
      const first = await step("fast-phase1", "echo fast1");
      const second = await step("fast-phase2", `echo "fast2 after ${first.trim()}"`);
      return [first, second];
    },
  ]);
  return { slow, chain };
}
"""

AGENT_THEN_SHELL = """\
import { defineTask } from "@a5c-ai/babysitter-sdk";

const ask = defineTask("ask", (args) => ({
  kind: "agent",
  title: "ask the agent",
  agent: { name: "helper", prompt: args.prompt },
}));
const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command },
}));

export async function process(inputs, ctx) {
  const [answer, listing] = await ctx.parallel.all([
    () => ctx.task(ask, { prompt: "what is 6 * 7?" }, { label: "ask" }),
    () => ctx.task(shellStep, { title: "ls", command: "echo listed" }, { label: "ls" }),
  ]);
  return { answer, listing };
}
"""

THROWS = """\
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command },
}));

export async function process(inputs, ctx) {
  const seen = await ctx.task(shellStep, { title: "probe", command: "echo 41" }, { label: "probe" });
  throw new RangeError(`cannot go on after ${seen.trim()}`);
}
"""


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def daemon(shared_daemon: DaemonHandle) -> DaemonHandle:
    """The drivers need only *a* daemon (each run's effects carry their own run label, and none
    stops the daemon): the tests share the module's."""
    return shared_daemon


def custom_run(cli: BabysitterCli, sdk: Any, tmp_path: Path, name: str, source: str,
               inputs: Any = None) -> Path:
    """A run of a process written here (next to a node_modules link to the SDK's)."""
    workdir = tmp_path / "custom"
    processes = workdir / "processes"
    if not processes.is_dir():
        processes.mkdir(parents=True)
        (workdir / "node_modules").symlink_to(sdk.node_modules, target_is_directory=True)
    process_file = processes / f"{name}.mjs"
    process_file.write_text(source)
    return cli.create_run(process_file, runs_dir=workdir / "runs", inputs=inputs,
                          process_id=name.replace("_", "-"))


def run_driver(daemon: DaemonHandle, cli: BabysitterCli, run_dir: Path,
               **options: Any) -> tuple[DriveResult, list[DriveEvent]]:
    events: list[DriveEvent] = []
    driver = Driver(run_dir, babysitter=cli, client=daemon.client(), on_event=events.append,
                    timeout=45, **options)
    return driver.run(), events


def resolved_order(run_dir: Path) -> list[str]:
    return [e.data["effectId"] for e in read_journal(run_dir) if e.type == "EFFECT_RESOLVED"]


def labels_of(run_dir: Path) -> dict[str, str]:
    """effectId -> label, from the EFFECT_REQUESTED events."""
    return {e.data["effectId"]: e.data.get("label") for e in read_journal(run_dir)
            if e.type == "EFFECT_REQUESTED"}


def by_label(run_dir: Path) -> dict[str, str]:
    return {label: eid for eid, label in labels_of(run_dir).items()}


def assert_exactly_once(run_dir: Path) -> None:
    counts = resolved_effect_ids(run_dir)
    assert set(counts) == requested_effect_ids(run_dir), "an effect was left unresolved"
    assert set(counts.values()) == {1}, f"an effect was resolved more than once: {counts}"


def effectd_records(daemon: DaemonHandle, run_dir: Path) -> list[Any]:
    c = daemon.client()
    return list(c.list(labels={"babysitter.run": str(run_dir)}, limit=1000))


def drive_command(run_dir: Path, babysitter: BabysitterCli, *extra: str) -> list[str]:
    """``effectctl babysitter drive`` once it is registered on effectctl; the same click
    command run stand-alone until then."""
    from effectd.cli import main

    args = ["drive", str(run_dir), "--babysitter", babysitter.command[0], *extra]
    if "babysitter" in getattr(main, "commands", {}):
        return [sys.executable, "-c", "from effectd.cli import main; main()", "babysitter", *args]
    return [sys.executable, "-m", "effectd.babysitter.cli", *args]


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_parallel_shell_tasks_posted_in_completion_order(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, make_run: Any
) -> None:
    # Requested in the order short, medium, long; they finish medium, long, short.
    run_dir = make_run("parallel_three", inputs={"durations": [1.6, 0.1, 0.8]})
    result, events = run_driver(daemon, babysitter_cli, run_dir)

    assert result.status == "completed", result.to_json()
    assert result.exit_code == 0
    assert result.output == {"short": "short\n", "medium": "medium\n", "long": "long\n"}
    ids = by_label(run_dir)
    assert resolved_order(run_dir) == [ids["medium"], ids["long"], ids["short"]]
    assert_exactly_once(run_dir)
    assert result.posts == 3
    # Every effect ran once in effectd, with the labels and the parallel group of the batch.
    records = effectd_records(daemon, run_dir)
    assert sorted(r.labels["babysitter.effect"] for r in records) == sorted(ids.values())
    assert {r.labels["babysitter.kind"] for r in records} == {"shell"}
    groups = {r.spec.get("group") for r in records}
    assert len(groups) == 1 and str(groups.pop()).startswith("bs-")
    assert all(r.exit_code == 0 for r in records)
    # Results were posted with their output files copied into the run.
    for label, eid in ids.items():
        assert (run_dir / "tasks" / eid / "stdout.log").read_text() == f"{label}\n"
        meta = json.loads((run_dir / "tasks" / eid / "result.json").read_text())["metadata"]
        assert meta["effectd"]["exitCode"] == 0
    kinds = [e.kind for e in events]
    assert kinds.count("started") == 3 and kinds.count("posted") == 3
    summary = result.to_json()
    assert summary["effects_run"] == 3 and summary["posted"] == 3
    assert summary["iterations"] == result.iterations >= 2


@pytest.mark.slow
def test_phase_two_starts_before_the_slowest_phase_one_sibling_finishes(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, babysitter_sdk: Any, tmp_path: Path
) -> None:
    run_dir = custom_run(babysitter_cli, babysitter_sdk, tmp_path, "tail_chain", TAIL_CHAIN,
                         inputs={"slow": 4})
    result, _ = run_driver(daemon, babysitter_cli, run_dir)

    assert result.status == "completed", result.to_json()
    assert result.output == {"slow": "slow\n",
                             "chain": ["fast1\n", "fast2 after fast1\n"]}
    assert_exactly_once(run_dir)
    ids = by_label(run_dir)
    records = {r.labels["babysitter.label"]: r for r in effectd_records(daemon, run_dir)}
    assert set(records) == {"slow", "fast-phase1", "fast-phase2"}
    # The phase-2 effect ran while the slow phase-1 sibling was still running ...
    slow, phase2 = records["slow"], records["fast-phase2"]
    assert phase2.started_at is not None and slow.finished_at is not None
    assert phase2.finished_at is not None and phase2.finished_at < slow.finished_at
    # ... and in the journal it was requested, and resolved, before "slow" was resolved.
    journal = [(e.type, e.data.get("effectId")) for e in read_journal(run_dir)]
    slow_resolved = journal.index(("EFFECT_RESOLVED", ids["slow"]))
    assert journal.index(("EFFECT_REQUESTED", ids["fast-phase2"])) < slow_resolved
    assert journal.index(("EFFECT_RESOLVED", ids["fast-phase2"])) < slow_resolved


@pytest.mark.slow
def test_failing_shell_task_is_posted_ok_with_success_false(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, make_run: Any
) -> None:
    run_dir = make_run("failing_shell")
    result, _ = run_driver(daemon, babysitter_cli, run_dir)

    assert result.status == "completed", result.to_json()
    assert result.output == {
        "failed": True,
        "exitCode": 3,
        "stdout": "partial output\n",
        "stderr": "something broke\n",
        "error": "Shell command exited with code 3",
        "after": "recovered\n",
    }
    assert_exactly_once(run_dir)
    statuses = {e.data["effectId"]: e.data["status"] for e in read_journal(run_dir)
                if e.type == "EFFECT_RESOLVED"}
    assert set(statuses.values()) == {"ok"}
    fails = by_label(run_dir)["fails"]
    value = json.loads((run_dir / "tasks" / fails / "result.json").read_text())["value"]
    assert value["success"] is False and value["exitCode"] == 3
    assert (run_dir / "tasks" / fails / "stderr.log").read_text() == "something broke\n"
    outcome = {e.label: e for e in result.effects}
    assert outcome["fails"].exit_code == 3 and outcome["fails"].posted == "ok"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_driver_restarts_without_rerunning_or_reposting(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, make_run: Any
) -> None:
    run_dir = make_run("parallel_three", inputs={"durations": [0.1, 4, 5]})
    cmd = drive_command(run_dir, babysitter_cli, "--json")
    first = subprocess.Popen(cmd, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Kill it once the first effect is posted: the other two still run in effectd.
        wait_until(lambda: resolved_effect_ids(run_dir) or first.poll() is not None,
                   timeout=30, what="the first posted result")
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(10)
    assert first.returncode == -signal.SIGKILL, first.stderr.read() if first.stderr else ""
    assert len(resolved_effect_ids(run_dir)) == 1
    running = [r for r in effectd_records(daemon, run_dir) if not r.final]
    assert len(running) == 2, "the killed driver's effects should keep running in effectd"

    second = subprocess.run(cmd, env=daemon.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["status"] == "completed"
    assert summary["effects_run"] == 0 and summary["effects_reused"] == 2
    assert summary["posted"] + summary["already_resolved"] == 2
    assert summary["output"] == {"short": "short\n", "medium": "medium\n", "long": "long\n"}

    assert_exactly_once(run_dir)
    assert [e.type for e in read_journal(run_dir)].count("RUN_COMPLETED") == 1
    records = effectd_records(daemon, run_dir)
    assert len(records) == 3, "an effect ran twice"
    assert sorted(r.labels["babysitter.effect"] for r in records) == sorted(
        requested_effect_ids(run_dir))

    # A third start finds the run completed and does not iterate it again.
    third = subprocess.run(cmd, env=daemon.env, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["already_terminal"] is True
    assert [e.type for e in read_journal(run_dir)].count("RUN_COMPLETED") == 1


@pytest.mark.slow
def test_sleep_is_posted_at_its_target_never_before(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, make_run: Any
) -> None:
    until = int(time.time() * 1000) + 2500
    run_dir = make_run("sleep_until", inputs={"until": until})
    result, _ = run_driver(daemon, babysitter_cli, run_dir)

    assert result.status == "completed", result.to_json()
    assert result.output == {"slept": None, "after": "awake\n"}
    assert_exactly_once(run_dir)
    (sleep_id,) = [e.data["effectId"] for e in read_journal(run_dir)
                   if e.type == "EFFECT_REQUESTED" and e.data["kind"] == "sleep"]
    resolved = next(e for e in read_journal(run_dir)
                    if e.type == "EFFECT_RESOLVED" and e.data["effectId"] == sleep_id)
    assert resolved.recorded_at is not None and epoch(resolved.recorded_at) * 1000 >= until
    assert "stdoutRef" not in resolved.data or resolved.data["stdoutRef"] is None
    value = json.loads((run_dir / "tasks" / sleep_id / "result.json").read_text())["value"]
    assert epoch(value["sleptUntil"]) * 1000 >= until
    sleeps = [r for r in effectd_records(daemon, run_dir) if r.kind == "sleep"]
    assert len(sleeps) == 1 and sleeps[0].labels["babysitter.effect"] == sleep_id


@pytest.mark.slow
def test_node_task(daemon: DaemonHandle, babysitter_cli: BabysitterCli, make_run: Any,
                   tmp_path: Path) -> None:
    script = tmp_path / "hello.mjs"
    script.write_text(
        "const i = process.argv.indexOf('--name');\n"
        "console.log(JSON.stringify({greeting: process.env.GREETING, name: process.argv[i + 1],"
        " cwd: process.cwd()}));\n"
    )
    run_dir = make_run("node_task", inputs={"entry": str(script), "cwd": str(tmp_path)})
    result, _ = run_driver(daemon, babysitter_cli, run_dir)
    assert result.status == "completed", result.to_json()
    assert result.output == {"result": {"greeting": "hi", "name": "effectd", "cwd": str(tmp_path)}}
    (record,) = effectd_records(daemon, run_dir)
    assert record.spec["argv"][0] == "node" and record.spec["timeout"] == 20.0
    assert_exactly_once(run_dir)


@pytest.mark.slow
def test_unsupported_kind_is_left_waiting_then_run_by_exec_kind(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, babysitter_sdk: Any, tmp_path: Path
) -> None:
    run_dir = custom_run(babysitter_cli, babysitter_sdk, tmp_path, "agent_then_shell",
                         AGENT_THEN_SHELL)
    cmd = drive_command(run_dir, babysitter_cli)
    waiting = subprocess.run(cmd, env=daemon.env, capture_output=True, text=True, timeout=60)
    assert waiting.returncode == EXIT_WAITING, waiting.stderr
    assert "waiting on 1 effect of kinds agent (1)" in waiting.stderr
    assert "'ask'" in waiting.stderr
    ask = by_label(run_dir)["ask"]
    assert set(resolved_effect_ids(run_dir)) == {by_label(run_dir)["ls"]}

    runner = tmp_path / "runner.py"
    runner.write_text(
        "import json, sys\n"
        "action = json.load(open(sys.argv[1]))\n"
        "print(json.dumps({'answer': 42, 'prompt': action['taskDef']['agent']['prompt'],"
        " 'effect': action['effectId']}))\n"
    )
    done = subprocess.run(
        [*cmd, "--exec-kind", f"agent={sys.executable} {runner} {{task_json}}", "--json"],
        env=daemon.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["output"] == {
        "answer": {"answer": 42, "prompt": "what is 6 * 7?", "effect": ask},
        "listing": "listed\n",
    }
    assert_exactly_once(run_dir)
    assert (run_dir / "tasks" / ask / "artifacts" / "effectd-action.json").is_file()


@pytest.mark.slow
def test_failed_run_exits_1_with_the_sdk_error(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, babysitter_sdk: Any, tmp_path: Path
) -> None:
    run_dir = custom_run(babysitter_cli, babysitter_sdk, tmp_path, "throws", THROWS)
    proc = subprocess.run(drive_command(run_dir, babysitter_cli, "--json"), env=daemon.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "run failed: RangeError: cannot go on after 41" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "failed" and summary["posted"] == 1
    assert summary["error"]["name"] == "RangeError"
    assert [e.type for e in read_journal(run_dir)].count("RUN_FAILED") == 1


@pytest.mark.slow
def test_second_driver_on_the_same_run_is_refused(
    daemon: DaemonHandle, babysitter_cli: BabysitterCli, make_run: Any
) -> None:
    from effectd.babysitter import DriveError

    run_dir = make_run("parallel_three", inputs={"durations": [0, 0, 0]})
    first = Driver(run_dir, babysitter=babysitter_cli, client=daemon.client())
    lock = first._acquire_driver_lock()
    try:
        with pytest.raises(DriveError, match="another driver"):
            Driver(run_dir, babysitter=babysitter_cli, client=daemon.client()).run()
    finally:
        os.close(lock)
