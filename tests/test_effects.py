"""Effects end to end through a real daemon: every kind, exact output, outcomes, cancel, timeouts,
concurrency, cwd/env, spawn failures, list/status/result errors and exact late-join streams.

Most tests share one module-scoped daemon (a daemon per test would dominate the run time);
tests that need other daemon flags, or reproduce a bug, start their own through conftest's
fixtures. Either way teardown proves no worker or effect process survives.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from effectd.client import Client, EffectState, InvalidState, NotFound, shell_spec
from tests.conftest import DaemonHandle, wait_until

UNKNOWN_ID = "0" * 26  # a well-formed ULID no daemon ever generates (timestamp 0)
SEQ_200K = b"".join(b"%d\n" % i for i in range(1, 200_001))


@pytest.fixture(scope="module")
def shared(shared_daemon: DaemonHandle) -> DaemonHandle:
    return shared_daemon


@pytest.fixture
def c(shared: DaemonHandle) -> Iterator[Client]:
    """A client of the shared daemon. Afterwards: no process of a final effect is alive."""
    client = Client(shared.runtime, state=shared.state, autostart=False)
    try:
        yield client
        final_ids = {r.id for r in client.list(limit=10_000) if r.final}
        assert not shared.effect_processes(final_ids), "a final effect left processes behind"
    finally:
        client.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stdout_of(client: Client, eid: str) -> bytes:
    return client.output(eid, "stdout")


# ---- each kind: submit -> status -> wait -> result -------------------------------------------


def test_shell_argv_lifecycle(c: Client) -> None:
    eid = c.submit_shell(["printf", "%s|%s", "a b", "c"])
    rec = c.status(eid)
    assert (rec.id, rec.kind) == (eid, "shell")
    assert rec.spec["argv"] == ["printf", "%s|%s", "a b", "c"]
    assert rec.state in (EffectState.QUEUED, EffectState.RUNNING, EffectState.SUCCEEDED)
    done = c.wait(eid, timeout=10)
    assert (done.state, done.exit_code, done.signal) == (EffectState.SUCCEEDED, 0, None)
    assert None not in (done.submitted_at, done.started_at, done.finished_at)
    assert done.submitted_at <= done.started_at <= done.finished_at  # type: ignore[operator]
    res = c.result(eid)
    assert (res.state, res.exit_code) == (EffectState.SUCCEEDED, 0)
    assert stdout_of(c, eid) == b"a b|c"
    assert c.output(eid, "stderr") == b""


def test_shell_command_string_runs_through_sh(c: Client) -> None:
    eid = c.submit_shell("x=2; echo $((x + 1)) | tr 3 Z")
    assert c.status(eid).spec["command"] == "x=2; echo $((x + 1)) | tr 3 Z"
    rec = c.wait(eid, timeout=10)
    assert rec.state is EffectState.SUCCEEDED
    assert c.result(eid).exit_code == 0
    assert stdout_of(c, eid) == b"Z\n"


def test_python_lifecycle_return_value(c: Client) -> None:
    eid = c.submit_python("effectd_test_effects:echo", [1, "two", [3]], {"k": {"n": None}})
    assert c.status(eid).kind == "python"
    rec = c.wait(eid, timeout=10)
    assert rec.state is EffectState.SUCCEEDED
    expected = {"args": [1, "two", [3]], "kwargs": {"k": {"n": None}}}
    assert rec.result == expected
    assert c.result(eid).result == expected
    assert rec.error is None


def test_sleep_lifecycle(c: Client) -> None:
    eid = c.submit_sleep(0.1)
    assert c.status(eid).kind == "sleep"
    rec = c.wait(eid, timeout=10)
    assert rec.state is EffectState.SUCCEEDED
    assert rec.started_at is not None and rec.finished_at is not None
    res = c.result(eid)
    assert res.state is EffectState.SUCCEEDED and res.result is None


# ---- output: separated and byte-exact ---------------------------------------------------------


def test_stdout_stderr_separated(c: Client) -> None:
    eid = c.submit_shell("echo o1; echo e1 >&2; echo o2; echo e2 >&2; printf tail")
    assert c.wait(eid, timeout=10).state is EffectState.SUCCEEDED
    assert c.output(eid, "stdout") == b"o1\no2\ntail"
    assert c.output(eid, "stderr") == b"e1\ne2\n"
    rec = c.status(eid)
    assert rec.sizes["stdout"] == len(b"o1\no2\ntail") and rec.sizes["stderr"] == len(b"e1\ne2\n")


def test_binary_and_non_utf8_output_exact(c: Client) -> None:
    # dash's printf has no \x escapes: octal \377 \000 \376 are the bytes ff 00 fe.
    eid = c.submit_shell(r"printf '\377\000\376'; printf '\200\300\000' >&2")
    assert c.wait(eid, timeout=10).state is EffectState.SUCCEEDED
    assert c.output(eid, "stdout") == b"\xff\x00\xfe"
    assert c.output(eid, "stderr") == b"\x80\xc0\x00"
    streamed = b"".join(ch.data for ch in c.stream(eid) if ch.stream == "stdout")
    assert streamed == b"\xff\x00\xfe"


def test_random_bytes_match_file_written_by_tee(c: Client, tmp_path: Path) -> None:
    copy = tmp_path / "copy.bin"
    eid = c.submit_shell(f"head -c 100000 /dev/urandom | tee {copy}")
    assert c.wait(eid, timeout=20).state is EffectState.SUCCEEDED
    expected = copy.read_bytes()
    assert len(expected) == 100_000
    assert c.output(eid, "stdout") == expected
    streamed = b"".join(ch.data for ch in c.stream(eid, streams=("stdout",)))
    assert streamed == expected


# ---- python outcomes --------------------------------------------------------------------------


def test_python_exception_is_failed_with_error(c: Client) -> None:
    eid = c.submit_python("effectd_test_effects:boom", ["kaput"])
    rec = c.wait(eid, timeout=10)
    assert rec.state is EffectState.FAILED
    assert rec.error is not None
    assert rec.error.type.endswith("ValueError")
    assert rec.error.message == "kaput"
    assert "Traceback" in rec.error.traceback
    assert "def boom" in rec.error.traceback or "raise ValueError" in rec.error.traceback
    assert "ValueError: kaput" in rec.error.traceback
    assert c.result(eid).error == rec.error


def test_python_unserializable_return_fails_clearly(c: Client) -> None:
    eid = c.submit_python("effectd_test_effects:unserializable")
    rec = c.wait(eid, timeout=10)
    assert rec.state is EffectState.FAILED
    assert rec.error is not None
    assert "serializ" in rec.error.message
    assert "object" in rec.error.message


def test_python_generator_streams_values_in_order(c: Client) -> None:
    eid = c.submit_python("effectd_test_effects:count", [50], {"delay": 0.005})
    values = list(c.values(eid))  # live: joins while the generator is still yielding
    assert values == list(range(50))
    rec = c.wait(eid, timeout=10)
    assert rec.state is EffectState.SUCCEEDED and rec.result is None
    assert list(c.values(eid)) == list(range(50))  # replay after the fact: identical


@pytest.mark.slow
def test_python_printed_output_captured(client: Client) -> None:
    c = client  # own daemon: the runs share one worker and nothing else uses it
    # Ten runs in one worker: on the buggy daemon nearly every run after the first loses it.
    for i in range(10):
        eid = c.submit_python("effectd_test_effects:prints", [f"héllo {i}"])
        rec = c.wait(eid, timeout=10)
        assert (rec.state, rec.result) == (EffectState.SUCCEEDED, "printed")
        assert c.output(eid, "stdout") == f"héllo {i}\n".encode(), f"run {i}"
        assert c.output(eid, "stderr") == f"err:héllo {i}\n".encode(), f"run {i}"


def test_python_progress_reported(c: Client) -> None:
    eid = c.submit_python("effectd_test_effects:with_progress", [4])
    rec = c.wait(eid, timeout=10)
    assert (rec.state, rec.result) == (EffectState.SUCCEEDED, 4)


# ---- exit codes and signals -------------------------------------------------------------------


def test_exit_codes_and_signals_reported(c: Client) -> None:
    ok, failed = EffectState.SUCCEEDED, EffectState.FAILED
    cases = {"exit 0": (ok, 0, None), "exit 3": (failed, 3, None), "exit 255": (failed, 255, None),
             "kill -TERM $$": (failed, None, 15), "kill -9 $$": (failed, None, 9)}
    ids = {c.submit_shell(cmd): cmd for cmd in cases}
    for rec in c.wait_many(list(ids), timeout=15):
        cmd = ids[rec.id]
        assert (rec.state, rec.exit_code, rec.signal) == cases[cmd], cmd
        if rec.signal:  # the reason names the signal, by number or by name
            name = signal.Signals(rec.signal).name
            assert rec.reason and (str(rec.signal) in rec.reason or name in rec.reason), rec.reason
        elif rec.exit_code:
            assert rec.reason and str(rec.exit_code) in rec.reason, rec.reason


@pytest.mark.slow
def test_sequential_shell_effects_keep_their_output(client: Client) -> None:
    """Regression: pipes were closed twice, the second time after the fd number was reused
    by the next shell effect of the same worker (lost output or SIGPIPE)."""
    c = client  # a fresh daemon: all three effects run in one worker, one after the other
    for word in ("first", "second", "third"):
        rec = c.wait(c.submit_shell(f"echo {word}; echo {word}-err >&2"), timeout=10)
        assert (rec.state, rec.signal) == (EffectState.SUCCEEDED, None), (word, rec.reason)
        assert c.output(rec.id, "stdout") == f"{word}\n".encode(), word
        assert c.output(rec.id, "stderr") == f"{word}-err\n".encode(), word


# ---- timeouts ---------------------------------------------------------------------------------


def test_shell_timeout_kills_and_reports_timed_out(c: Client) -> None:
    eid = c.submit_shell("sleep 30", timeout=0.5)
    rec = c.wait(eid, timeout=15)
    assert rec.state is EffectState.TIMED_OUT
    assert rec.reason == "timeout"
    assert rec.pid is not None and not alive(rec.pid)
    assert rec.finished_at is not None and rec.started_at is not None


@pytest.mark.slow
def test_python_timeout_replaces_worker(c: Client) -> None:
    eid = c.submit_python("effectd_test_effects:block_forever", timeout=0.5)
    rec = c.wait(eid, timeout=15)
    assert rec.state is EffectState.TIMED_OUT
    assert rec.pid is not None
    old_worker = rec.pid  # a python effect runs inside its worker: pid is the worker's
    wait_until(lambda: not alive(old_worker), timeout=10, what="the poisoned worker to exit")
    after = c.submit_python("effectd_test_effects:add", [20, 22])
    rec2 = c.wait(after, timeout=15)
    assert (rec2.state, rec2.result) == (EffectState.SUCCEEDED, 42)
    assert rec2.pid != old_worker


@pytest.mark.slow
def test_python_effect_never_shares_a_poisoned_worker(daemon_factory: Any) -> None:
    d = daemon_factory("--parallel", "1", "--kill-grace", "1")
    c = d.client()
    stuck = c.submit_python("effectd_test_effects:block_forever", timeout=0.5)
    nxt = c.submit_python("os:getpid")  # queued behind it (--parallel 1)
    r_stuck, r_next = c.wait_many([stuck, nxt], timeout=20)
    assert r_stuck.state is EffectState.TIMED_OUT
    assert r_next.state is EffectState.SUCCEEDED
    assert r_next.result != r_stuck.pid, "ran in the worker whose timed-out thread still runs"


def test_sleep_timeout(c: Client) -> None:
    rec = c.wait(c.submit_sleep(30, timeout=0.2), timeout=10)
    assert rec.state is EffectState.TIMED_OUT


# ---- cancel -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_queued_effect(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory("--parallel", "1", "--kill-grace", "1")
    c = d.client()
    started = tmp_path / "blocker.started"
    blocker = c.submit_shell(f"touch {started}; exec sleep 30")
    wait_until(started.exists, what="the blocker to run")
    queued = c.submit_shell("echo should-not-run")
    assert c.status(queued).state is EffectState.QUEUED  # --parallel 1 and the blocker runs
    replies = c.cancel(queued)
    assert replies == [{"id": queued, "state": "cancelled", "cancelled": True}]
    rec = c.wait(queued, timeout=5)
    assert rec.state is EffectState.CANCELLED
    assert rec.started_at is None and rec.pid is None and rec.attempt == 0
    assert c.status(blocker).state is EffectState.RUNNING
    c.cancel(blocker)
    assert c.wait(blocker, timeout=10).state is EffectState.CANCELLED
    assert c.output(queued, "stdout") == b""


def test_cancel_running_effect_kills_its_tree(c: Client, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    eid = c.submit_shell(f"sleep 30 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait")
    wait_until(pidfile.exists, what="the effect's child pid file")
    child = int(pidfile.read_text())
    root = wait_until(lambda: c.status(eid).pid, what="the root pid in the record")
    assert alive(child) and alive(root)
    assert c.status(eid).state is EffectState.RUNNING
    reply = c.cancel(eid, reason="test says stop")
    assert reply[0]["id"] == eid and reply[0]["cancelled"] is True
    rec = c.wait(eid, timeout=15)
    assert rec.state is EffectState.CANCELLED
    assert rec.reason == "test says stop"
    assert not alive(root)
    assert not alive(child)
    # cancelling a final effect changes nothing
    again = c.cancel(eid)
    assert again == [{"id": eid, "state": "cancelled", "cancelled": False}]


# ---- concurrency ------------------------------------------------------------------------------


def assert_all_overlap(records: list[Any]) -> None:
    for a in records:
        for b in records:
            assert a.started_at < b.finished_at, f"{a.id} started after {b.id} finished"


@pytest.mark.slow
def test_eight_sleeps_overlap(c: Client) -> None:
    ids = [c.submit_shell("sleep 1") for _ in range(8)]
    done = list(c.as_completed(ids, timeout=20))
    assert sorted(r.id for r in done) == sorted(ids)
    assert all(r.state is EffectState.SUCCEEDED for r in done)
    assert_all_overlap(done)


@pytest.mark.slow
def test_thirty_sleeps_overlap_with_parallel_30(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory("--parallel", "30", "--kill-grace", "1")
    c = d.client()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each effect checks in, then waits until all 30 have: only possible if all 30 run at once.
    cmd = (f"touch {barrier}/$EFFECTD_EFFECT_ID; "
           f"while [ $(ls {barrier} | wc -l) -lt 30 ]; do sleep 0.02; done; sleep 0.3")
    ids = c.submit_many([shell_spec(cmd, timeout=20) for _ in range(30)])
    records = c.wait_many(ids, timeout=30)
    assert [r.state for r in records] == [EffectState.SUCCEEDED] * 30, [r.reason for r in records]
    assert len(list(barrier.iterdir())) == 30
    assert_all_overlap(records)


# ---- cwd and env ------------------------------------------------------------------------------


def test_cwd(c: Client, tmp_path: Path) -> None:
    eid = c.submit_shell(["pwd", "-P"], cwd=tmp_path)
    assert c.wait(eid, timeout=10).state is EffectState.SUCCEEDED
    assert stdout_of(c, eid) == f"{os.path.realpath(tmp_path)}\n".encode()
    py = c.submit_python("os:getcwd", cwd=tmp_path)
    assert c.wait(py, timeout=10).result == os.path.realpath(tmp_path)


def test_default_env_is_the_submitters(c: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    token = uuid.uuid4().hex
    monkeypatch.setenv("EFFECTD_TEST_SUBMITTER", token)  # set after the daemon started
    eid = c.submit_shell('printf %s "$EFFECTD_TEST_SUBMITTER"')
    assert c.wait(eid, timeout=10).state is EffectState.SUCCEEDED
    assert stdout_of(c, eid) == token.encode()


def test_env_override(c: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFFECTD_TEST_VAR", "submitter")
    eid = c.submit_shell('printf "%s %s" "$EFFECTD_TEST_VAR" "$EXTRA"',
                         env={"EFFECTD_TEST_VAR": "override", "EXTRA": "x y"})
    assert c.wait(eid, timeout=10).state is EffectState.SUCCEEDED
    assert stdout_of(c, eid) == b"override x y"


def test_env_without_inheritance_is_exact(c: Client) -> None:
    eid = c.submit_shell(["/usr/bin/env"], env={"ONLY": "1"}, inherit_env=False)
    assert c.wait(eid, timeout=10).state is EffectState.SUCCEEDED
    lines = stdout_of(c, eid).decode().splitlines()
    assert "ONLY=1" in lines and f"EFFECTD_EFFECT_ID={eid}" in lines
    others = [ln for ln in lines if ln != "ONLY=1"]
    assert all(ln.startswith("EFFECTD_") for ln in others), others  # only effectd's own markers


# ---- spawn failure ----------------------------------------------------------------------------


def test_nonexistent_program_fails_to_spawn(c: Client) -> None:
    rec = c.wait(c.submit_shell(["/nonexistent/effectd-no-such-program", "x"]), timeout=10)
    assert rec.state is EffectState.FAILED
    assert rec.reason == "spawn_failed"
    assert rec.error is not None and rec.error.type == "FileNotFoundError"
    assert "effectd-no-such-program" in rec.error.message
    assert rec.exit_code is None


def test_bad_cwd_fails_to_spawn(c: Client, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    rec = c.wait(c.submit_shell("true", cwd=missing), timeout=10)
    assert rec.state is EffectState.FAILED
    assert rec.reason == "spawn_failed"
    assert rec.error is not None and rec.error.type == "FileNotFoundError"
    assert str(missing) in rec.error.message


# ---- list, status, result ---------------------------------------------------------------------


def test_list_filters(c: Client) -> None:
    tag = uuid.uuid4().hex
    a = c.submit_shell("true", name=f"n-{tag}", labels={"t": tag, "k": "a"})
    b = c.submit_shell("false", labels={"t": tag, "k": "b"})
    s = c.submit_sleep(30, labels={"t": tag, "k": "s"})
    c.cancel(s)
    recs = c.wait_many([a, b, s], timeout=15)
    states = [r.state for r in recs]
    assert states == [EffectState.SUCCEEDED, EffectState.FAILED, EffectState.CANCELLED]

    def ids(**kw: Any) -> list[str]:
        return [r.id for r in c.list(**kw)]

    assert ids(labels={"t": tag}) == [s, b, a]  # newest first
    assert ids(labels={"t": tag}, limit=2) == [s, b]
    assert ids(labels={"t": tag}, limit=1) == [s]
    assert ids(labels={"t": tag}, before=s) == [b, a]
    assert ids(labels={"t": tag}, states=["failed"]) == [b]
    assert ids(labels={"t": tag}, states=["succeeded", "cancelled"]) == [s, a]
    assert ids(labels={"t": tag}, states=["running"]) == []
    assert ids(labels={"t": tag, "k": "a"}) == [a]
    assert ids(labels={"t": tag, "k": "nope"}) == []
    assert ids(name=f"n-{tag}") == [a]
    assert ids(name=f"n-{tag}", states=["failed"]) == []
    listed = c.list(labels={"t": tag, "k": "b"})[0]
    assert listed.labels == {"t": tag, "k": "b"} and listed.exit_code == 1


def test_status_of_unknown_id_is_not_found(c: Client) -> None:
    with pytest.raises(NotFound) as exc:
        c.status(UNKNOWN_ID)
    assert UNKNOWN_ID in str(exc.value)
    known = c.submit_sleep(0)
    with pytest.raises(NotFound):
        c.status_many([known, UNKNOWN_ID])
    with pytest.raises(NotFound):
        c.result(UNKNOWN_ID)
    with pytest.raises(NotFound):
        c.wait(UNKNOWN_ID, timeout=1)
    with pytest.raises(NotFound):
        c.cancel(UNKNOWN_ID)
    with pytest.raises(NotFound):
        c.read_output(UNKNOWN_ID)


def test_result_of_running_effect_is_invalid_state(c: Client, tmp_path: Path) -> None:
    started = tmp_path / "started"
    eid = c.submit_shell(f"touch {started}; exec sleep 30")
    wait_until(started.exists, what="the effect to start")
    with pytest.raises(InvalidState) as exc:
        c.result(eid)
    assert eid in str(exc.value)
    c.cancel(eid)
    assert c.wait(eid, timeout=10).state is EffectState.CANCELLED
    assert c.result(eid).state is EffectState.CANCELLED


# ---- streams: late join, exactness, two followers ---------------------------------------------


def collect(client: Client, eid: str, **kw: Any) -> dict[str, bytes]:
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    for ch in client.stream(eid, **kw):
        assert ch.offset == len(out[ch.stream]) + kw.get("from_offset", 0), "chunk out of order"
        out[ch.stream] += ch.data
    return {k: bytes(v) for k, v in out.items()}


def test_stream_after_finish_is_exact(c: Client) -> None:
    eid = c.submit_shell("seq 1 200000")
    assert c.wait(eid, timeout=20).state is EffectState.SUCCEEDED
    got = collect(c, eid)
    assert got["stdout"] == SEQ_200K
    assert got["stderr"] == b""
    half = len(SEQ_200K) // 2
    assert collect(c, eid, from_offset=half)["stdout"] == SEQ_200K[half:]


def gated_seq(gate: Path) -> str:
    """seq 1 200000 in two halves; the second waits for ``gate`` (so a follower joins mid-run)."""
    return (f"seq 1 100000; echo half >&2; "
            f"while [ ! -e {gate} ]; do sleep 0.01; done; seq 100001 200000; echo end >&2")


def test_stream_late_join_while_running_is_exact(c: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    eid = c.submit_shell(gated_seq(gate), timeout=25)
    first_half = b"".join(b"%d\n" % i for i in range(1, 100_001))
    wait_until(lambda: c.read_output(eid, "stderr").size >= 5, what="the first half to be written")
    assert c.status(eid).state is EffectState.RUNNING
    chunks = c.stream(eid)
    got = {"stdout": bytearray(), "stderr": bytearray()}
    for ch in chunks:  # everything already written arrives first, from the store
        got[ch.stream] += ch.data
        if len(got["stdout"]) >= len(first_half) and got["stderr"] == b"half\n":
            break
    assert bytes(got["stdout"]) == first_half
    gate.touch()
    for ch in chunks:  # the rest arrives live
        got[ch.stream] += ch.data
    assert bytes(got["stdout"]) == SEQ_200K
    assert bytes(got["stderr"]) == b"half\nend\n"
    assert c.status(eid).state is EffectState.SUCCEEDED


def test_two_simultaneous_followers_agree(shared: DaemonHandle, c: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    eid = c.submit_shell(gated_seq(gate), timeout=25)
    results: list[Any] = [None, None]
    joined = [threading.Event(), threading.Event()]

    def follow(i: int) -> None:
        try:
            with Client(shared.runtime, state=shared.state, autostart=False) as fc:
                got = {"stdout": bytearray(), "stderr": bytearray()}
                for ch in fc.stream(eid):
                    got[ch.stream] += ch.data
                    joined[i].set()
                results[i] = {k: bytes(v) for k, v in got.items()}
        except BaseException as exc:  # reported by the main thread
            results[i] = exc
        finally:
            joined[i].set()

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for ev in joined:
            assert ev.wait(20), "a follower received nothing"
        assert c.status(eid).state is EffectState.RUNNING  # both joined while it runs
    finally:
        gate.touch()
        for t in threads:
            t.join(25)
    for r in results:
        assert isinstance(r, dict), r
    assert results[0] == results[1]
    assert results[0]["stdout"] == SEQ_200K
    assert results[0]["stderr"] == b"half\nend\n"
    assert c.wait(eid, timeout=10).state is EffectState.SUCCEEDED
