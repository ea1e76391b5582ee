"""effectd.babysitter.sdk against the real babysitter SDK (@a5c-ai/babysitter-sdk 0.0.187).

The runs are driven by hand here (iterate -> run shell commands with subprocess -> post ->
iterate), without effectd. The pure helpers are tested without the SDK at the bottom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from effectd.babysitter import (
    BabysitterCli,
    BabysitterError,
    IterateResult,
    PendingEffect,
    parse_node_task,
    parse_shell_task,
    parse_sleep,
    pending_effect_ids,
    read_journal,
    requested_effect_ids,
    resolved_effect_ids,
    shell_argv,
    shell_result_value,
    sleep_result_value,
)
from effectd.babysitter.sdk import _parse_trailing_json

try:
    from tests.babysitter.fixtures import (  # pytest fixtures, used by name
        babysitter_cli,
        babysitter_sdk,
        make_run,
    )
except ModuleNotFoundError:  # plain `pytest`: tests/ itself is on sys.path
    from babysitter.fixtures import (  # type: ignore[no-redef,import-not-found]  # noqa: F401
        babysitter_cli,
        babysitter_sdk,
        make_run,
    )


# --------------------------------------------------------------------------------------------
# A minimal hand-written driver: every pending shell effect runs concurrently, each result is
# posted as soon as its command finishes, then the run is iterated again.


@dataclass
class Running:
    effect: PendingEffect
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    files: tuple[IO[bytes], IO[bytes]]


def start_shell(effect: PendingEffect, logs: Path) -> Running:
    spec = parse_shell_task(effect)
    out_path = logs / f"{effect.effect_id}.out"
    err_path = logs / f"{effect.effect_id}.err"
    out, err = out_path.open("wb"), err_path.open("wb")
    env = {**os.environ, **(spec.env or {})}
    proc = subprocess.Popen(
        shell_argv(spec.command),
        cwd=spec.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
    )
    return Running(effect, proc, out_path, err_path, (out, err))


def finish_and_post(cli: BabysitterCli, run_dir: Path, running: Running) -> None:
    for fh in running.files:
        fh.close()
    code = running.proc.returncode
    stdout = running.stdout_path.read_text()
    stderr = running.stderr_path.read_text()
    value = shell_result_value(
        code if code is not None and code >= 0 else None,
        stdout,
        stderr,
        signal=-code if code is not None and code < 0 else None,
    )
    posted = cli.post(
        run_dir,
        running.effect.effect_id,
        status="ok",
        value=value,
        stdout_file=running.stdout_path,
        stderr_file=running.stderr_path,
    )
    assert posted["status"] == "ok"


@dataclass
class DriveLog:
    result: IterateResult
    batches: list[list[str]]  # labels of newly requested effects, per iterate
    finished: list[str]  # labels in the order their commands finished


def drive(cli: BabysitterCli, run_dir: Path, logs: Path, *, deadline: float = 25.0) -> DriveLog:
    logs.mkdir(exist_ok=True)
    running: dict[str, Running] = {}
    seen: set[str] = set()
    batches: list[list[str]] = []
    finished: list[str] = []
    result = cli.iterate(run_dir)
    end = time.monotonic() + deadline
    while not result.terminal:
        assert result.status == "waiting", result.raw
        ids = [e.effect_id for e in result.pending]
        assert len(ids) == len(set(ids)), "an effect listed twice"
        # Everything listed is either running already or new; nothing finished is listed again.
        new = [e for e in result.pending if e.effect_id not in seen]
        assert {e.effect_id for e in result.pending} - {e.effect_id for e in new} <= set(running)
        batches.append([e.display_name for e in new])
        for effect in new:
            assert effect.kind == "shell", effect.raw
            seen.add(effect.effect_id)
            running[effect.effect_id] = start_shell(effect, logs)
        assert running, "waiting with nothing to run"
        done: Running | None = None
        while done is None:
            assert time.monotonic() < end, "drive deadline passed"
            for item in running.values():
                if item.proc.poll() is not None:
                    done = item
                    break
            else:
                time.sleep(0.01)
        del running[done.effect.effect_id]
        finished.append(done.effect.display_name)
        finish_and_post(cli, run_dir, done)
        result = cli.iterate(run_dir)
    assert not running, "run ended with effects still running"
    return DriveLog(result, batches, finished)


# --------------------------------------------------------------------------------------------
# Real-SDK tests


@pytest.mark.slow
def test_sdk_version(babysitter_cli: BabysitterCli) -> None:
    assert babysitter_cli.version() == "0.0.187"


@pytest.mark.slow
def test_drive_three_parallel_shell_tasks(
    babysitter_cli: BabysitterCli, make_run: Any, tmp_path: Path
) -> None:
    run_dir = make_run("parallel_three")
    first = babysitter_cli.iterate(run_dir)
    assert first.status == "waiting"
    assert first.reason == "shell-pending"
    assert [e.label for e in first.pending] == ["short", "medium", "long"]
    groups = {e.parallel_group_id for e in first.pending}
    assert len(groups) == 1 and None not in groups
    assert all(e.scheduler_hints["pendingCount"] == 3 for e in first.pending)
    for effect in first.pending:
        assert effect.task_id == "shell-step"
        assert effect.invocation_key and effect.invocation_key.endswith(":shell-step")
        assert effect.task_def["shell"]["command"].startswith("sleep ")
        assert parse_shell_task(effect).timeout == 30.0
    # Iterating again without posting re-lists the same effects and writes nothing.
    events_before = len(read_journal(run_dir))
    again = babysitter_cli.iterate(run_dir)
    assert [e.effect_id for e in again.pending] == [e.effect_id for e in first.pending]
    assert len(read_journal(run_dir)) == events_before

    log = drive(babysitter_cli, run_dir, tmp_path / "logs")

    assert log.result.status == "completed", log.result.raw
    assert log.result.completion_proof
    assert log.result.output == {"short": "short\n", "medium": "medium\n", "long": "long\n"}
    assert log.batches[0] == ["short", "medium", "long"]
    assert all(batch == [] for batch in log.batches[1:])
    assert log.finished == ["short", "medium", "long"]
    ids = {e.effect_id for e in first.pending}
    assert requested_effect_ids(run_dir) == ids
    assert resolved_effect_ids(run_dir) == dict.fromkeys(ids, 1)
    assert pending_effect_ids(run_dir) == set()
    for effect in first.pending:  # --stdout-file was copied into the run
        log_file = run_dir / "tasks" / effect.effect_id / "stdout.log"
        assert log_file.read_text() == f"{effect.label}\n"


@pytest.mark.slow
def test_failed_shell_task_posted_ok_is_seen_by_the_process(
    babysitter_cli: BabysitterCli, make_run: Any, tmp_path: Path
) -> None:
    run_dir = make_run("failing_shell")
    log = drive(babysitter_cli, run_dir, tmp_path / "logs")
    assert log.result.status == "completed", log.result.raw
    assert log.batches == [["fails"], ["after"]]
    assert log.result.output == {
        "failed": True,
        "exitCode": 3,
        "stdout": "partial output\n",
        "stderr": "something broke\n",
        "error": "Shell command exited with code 3",
        "after": "recovered\n",
    }
    counts = resolved_effect_ids(run_dir)
    assert sorted(counts.values()) == [1, 1]
    assert set(counts) == requested_effect_ids(run_dir)


@pytest.mark.slow
def test_two_phase_branches(babysitter_cli: BabysitterCli, make_run: Any, tmp_path: Path) -> None:
    run_dir = make_run("two_phase")
    log = drive(babysitter_cli, run_dir, tmp_path / "logs")
    assert log.result.status == "completed", log.result.raw
    assert log.result.output == {
        "fast": ["fast-phase1", "fast-phase2 after fast-phase1"],
        "slow": ["slow-phase1", "slow-phase2 after slow-phase1"],
    }
    # Phase 2 is requested only once both phase-1 tasks are resolved (one batch per phase).
    assert [b for b in log.batches if b] == [
        ["fast-phase1", "slow-phase1"],
        ["fast-phase2", "slow-phase2"],
    ]
    assert log.finished == ["fast-phase1", "slow-phase1", "fast-phase2", "slow-phase2"]
    assert sorted(resolved_effect_ids(run_dir).values()) == [1, 1, 1, 1]


@pytest.mark.slow
def test_sequential_steps_inside_parallel_all_duplicate_effects(
    babysitter_cli: BabysitterCli, make_run: Any
) -> None:
    """Pins the 0.0.187 replay-cursor limitation documented in effectd.babysitter.sdk."""
    run_dir = make_run("two_phase_pipelined")
    first = babysitter_cli.iterate(run_dir)
    assert [e.label for e in first.pending] == ["a-phase1", "b-phase1"]
    babysitter_cli.post(run_dir, first.pending[0].effect_id, status="ok", value="a-phase1\n")
    second = babysitter_cli.iterate(run_dir)
    assert [e.label for e in second.pending] == ["b-phase1", "b-phase1"]
    assert second.pending[0].effect_id == first.pending[1].effect_id
    assert second.pending[1].effect_id not in {e.effect_id for e in first.pending}


@pytest.mark.slow
def test_post_exit_codes_and_refusals(babysitter_cli: BabysitterCli, make_run: Any) -> None:
    run_dir = make_run("parallel_three")
    short, medium, long = babysitter_cli.iterate(run_dir).pending
    ok = babysitter_cli.post(run_dir, short.effect_id, status="ok", value="short\n")
    assert ok["committed"]["resultRef"] == f"tasks/{short.effect_id}/result.json"
    assert ok["stdoutRef"] is None and ok["stderrRef"] is None

    with pytest.raises(BabysitterError) as second_post:
        babysitter_cli.post(run_dir, short.effect_id, status="ok", value="again")
    assert second_post.value.exit_code == 1
    assert second_post.value.not_requested
    assert "status=resolved_ok" in str(second_post.value)

    with pytest.raises(BabysitterError) as unknown:
        babysitter_cli.post(run_dir, "01NOSUCHEFFECT0000000000000", status="ok", value=1)
    assert "not found" in unknown.value.stderr_tail

    # An error post exits 1 after committing; post() treats that as success.
    err = babysitter_cli.post(
        run_dir, medium.effect_id, status="error", error=RuntimeError("medium blew up")
    )
    assert err["status"] == "error"
    assert resolved_effect_ids(run_dir) == {short.effect_id: 1, medium.effect_id: 1}

    # ... and makes ctx.task throw, which fails the run although "long" is still pending.
    failed = babysitter_cli.iterate(run_dir)
    assert failed.status == "failed" and failed.terminal
    assert failed.pending == []
    assert failed.error["name"] == "RuntimeError"
    assert failed.error["message"] == "medium blew up"
    assert pending_effect_ids(run_dir) == {long.effect_id}


@pytest.mark.slow
def test_large_value_goes_through_a_file(babysitter_cli: BabysitterCli, make_run: Any) -> None:
    run_dir = make_run("parallel_three", inputs={"durations": [0, 0, 0]})
    pending = babysitter_cli.iterate(run_dir).pending
    big = "x" * 300_000  # above one argv string's limit
    for effect in pending:
        babysitter_cli.post(run_dir, effect.effect_id, status="ok", value=big)
    done = babysitter_cli.iterate(run_dir)
    assert done.status == "completed"
    assert done.output == {"short": big, "medium": big, "long": big}


@pytest.mark.slow
def test_sleep_effect(babysitter_cli: BabysitterCli, make_run: Any, tmp_path: Path) -> None:
    until = int(time.time() * 1000) + 5000  # margin for two Node starts on a loaded 2-core machine
    run_dir = make_run("sleep_until", inputs={"until": until})
    first = babysitter_cli.iterate(run_dir)
    assert first.reason == "sleep-waiting"
    (sleep,) = first.pending
    assert sleep.kind == "sleep" and sleep.task_id == "__sdk.sleep"
    assert sleep.scheduler_hints["sleepUntilEpochMs"] == until
    assert parse_sleep(sleep) == until
    assert parse_sleep(sleep.raw) == until
    assert parse_sleep(sleep.task_def) == until
    delay = until / 1000 - time.time()
    assert delay > 0, "iterate took too long for this test"
    time.sleep(delay + 0.05)
    babysitter_cli.post(run_dir, sleep.effect_id, status="ok", value=sleep_result_value())
    log = drive(babysitter_cli, run_dir, tmp_path / "logs")
    assert log.result.status == "completed"
    assert log.result.output == {"slept": None, "after": "awake\n"}
    assert set(resolved_effect_ids(run_dir).values()) == {1}
    assert pending_effect_ids(run_dir) == set()


@pytest.mark.slow
def test_node_task_definition(babysitter_cli: BabysitterCli, make_run: Any, tmp_path: Path) -> None:
    script = tmp_path / "hello.mjs"
    script.write_text(
        "const i = process.argv.indexOf('--name');\n"
        "console.log(JSON.stringify({greeting: process.env.GREETING, name: process.argv[i + 1],"
        " cwd: process.cwd()}));\n"
    )
    run_dir = make_run("node_task", inputs={"entry": str(script), "cwd": str(tmp_path)})
    (effect,) = babysitter_cli.iterate(run_dir).pending
    assert effect.kind == "node"
    spec = parse_node_task(effect)
    assert spec.argv == ["node", str(script), "--name", "effectd"]
    assert spec.cwd == str(tmp_path)
    assert spec.env == {"GREETING": "hi"}  # API_TOKEN dropped by the SDK's builder
    assert effect.task_def["metadata"]["redactedEnvKeys"] == ["API_TOKEN"]
    assert spec.timeout == 20.0
    out = subprocess.run(
        spec.argv,
        cwd=spec.cwd,
        env={**os.environ, **(spec.env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    value = json.loads(out.stdout)
    assert value == {"greeting": "hi", "name": "effectd", "cwd": str(tmp_path)}
    babysitter_cli.post(run_dir, effect.effect_id, status="ok", value=value)
    done = babysitter_cli.iterate(run_dir)
    assert done.status == "completed"
    assert done.output == {"result": value}


def test_cli_timeout_and_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(BabysitterError) as missing:
        BabysitterCli(str(tmp_path / "nope" / "babysitter")).version()
    assert missing.value.exit_code is None
    slow = BabysitterCli([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.3)
    with pytest.raises(BabysitterError) as timed_out:
        slow.iterate(tmp_path)
    assert "timed out" in str(timed_out.value)


# --------------------------------------------------------------------------------------------
# Pure helpers (no SDK needed)


def test_shell_result_value() -> None:
    assert shell_result_value(0, "out\n", "") == "out\n"
    assert shell_result_value(0, "o", "e", structured_ok=True) == {
        "success": True,
        "exitCode": 0,
        "stdout": "o",
        "stderr": "e",
    }
    assert shell_result_value(3, "o", "e") == {
        "success": False,
        "exitCode": 3,
        "stdout": "o",
        "stderr": "e",
        "error": "Shell command exited with code 3",
    }
    killed = shell_result_value(None, "", "", signal=9)
    assert killed["exitCode"] is None and killed["signal"] == 9 and killed["success"] is False
    timed = shell_result_value(None, "", "", signal=15, timed_out=True)
    assert timed["timedOut"] is True and timed["error"] == "Shell command timed out"
    failed_start = shell_result_value(None, "", "", error="spawn failed: ENOENT")
    assert failed_start["error"] == "spawn failed: ENOENT"
    assert shell_result_value(0, "", "", error="cancelled")["success"] is False


def test_parse_shell_task_variants() -> None:
    plain = parse_shell_task({"kind": "shell", "shell": {"command": "sleep 1; echo x"}})
    assert tuple(plain) == ("sleep 1; echo x", None, None, None)
    assert shell_argv(plain.command)[1:] == ["-c", "sleep 1; echo x"]
    argv = parse_shell_task(
        {
            "shell": {
                "command": "git",
                "args": ["log", "-1"],
                "cwd": "/tmp",
                "timeout": 1500,
                "env": {"A": 1, "B": None},
            }
        }
    )
    assert tuple(argv) == (["git", "log", "-1"], "/tmp", 1.5, {"A": "1"})
    assert shell_argv(argv.command) == ["git", "log", "-1"]
    joined = parse_shell_task({"shell": {"command": "npm run", "args": ["a b"]}})
    assert joined.command == "npm run 'a b'"
    from_meta = parse_shell_task({"metadata": {"command": "ls", "cwd": "/"}, "shell": {}})
    assert from_meta.command == "ls" and from_meta.cwd == "/"
    assert parse_shell_task({"shell": {"command": "x", "timeoutMs": 2000}}).timeout == 2.0
    with pytest.raises(ValueError):
        parse_shell_task({"shell": {}})


def test_parse_node_and_sleep_variants() -> None:
    spec = parse_node_task({"node": {"entry": "s.js", "args": ["a", 2], "timeoutMs": 900000}})
    assert tuple(spec) == (["node", "s.js", "a", "2"], None, None, 900.0)
    with pytest.raises(ValueError):
        parse_node_task({"node": {}})
    assert parse_sleep({"metadata": {"targetEpochMs": 5}}) == 5
    assert parse_sleep({"taskDef": {}, "schedulerHints": {"sleepUntilEpochMs": 7}}) == 7
    assert parse_sleep({"sleep": {"iso": "1970-01-01T00:00:01.500Z"}}) == 1500
    with pytest.raises(ValueError):
        parse_sleep({"kind": "sleep"})
    assert sleep_result_value(0) == {"sleptUntil": "1970-01-01T00:00:00.000Z"}


def test_parse_trailing_json_after_process_output() -> None:
    doc = {"status": "waiting", "nextActions": [{"effectId": "E"}]}
    text = "hello from the process\n{not json\n" + json.dumps(doc, indent=2) + "\n"
    assert _parse_trailing_json(text) == doc
    assert _parse_trailing_json(json.dumps(doc)) == doc
    with pytest.raises(ValueError):
        _parse_trailing_json("no json here\n")


def test_journal_readers_on_disk(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()

    def event(seq: int, ulid: str, type_: str, **data: Any) -> None:
        body = {"type": type_, "recordedAt": "t", "data": data, "checksum": "c"}
        (journal / f"{seq:06d}.{ulid}.json").write_text(json.dumps(body))

    event(1, "01A", "RUN_CREATED")
    event(2, "01B", "EFFECT_REQUESTED", effectId="E1")
    event(3, "01C", "EFFECT_REQUESTED", effectId="E2")
    event(4, "01D", "EFFECT_RESOLVED", effectId="E1", status="ok")
    event(10, "01E", "EFFECT_RESOLVED", effectId="E1", status="ok")
    (journal / "000005.01X.json.tmp-1-2-3").write_text("{")
    assert [e.seq for e in read_journal(tmp_path)] == [1, 2, 3, 4, 10]
    assert requested_effect_ids(tmp_path) == {"E1", "E2"}
    assert resolved_effect_ids(tmp_path) == {"E1": 2}
    assert pending_effect_ids(tmp_path) == {"E2"}
    assert read_journal(tmp_path / "missing") == []
