"""effectctl as a user runs it: a real subprocess talking to a test daemon through
EFFECTD_RUNTIME_DIR / EFFECTD_STATE_DIR. Output streams, exit codes (README "Exit codes of
effectctl"), --json outputs, follow, cancel, Ctrl-C, daemon status/stop.

The tests share one module-scoped daemon (effectctl invocations are what they exercise; a daemon
per test would triple the run time), except ``daemon stop``, which stops its own."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import psutil
import pytest

from effectd.client import Client, EffectState
from tests.conftest import DaemonHandle, wait_until

ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
UNKNOWN_ID = "0" * 26
CTL = [sys.executable, "-m", "effectd.cli"]


@pytest.fixture(scope="module")
def d(shared_daemon: DaemonHandle) -> DaemonHandle:
    return shared_daemon


@pytest.fixture
def c(d: DaemonHandle) -> Iterator[Client]:
    with Client(d.runtime, state=d.state, autostart=False) as client:
        yield client


def ctl(d: DaemonHandle, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Run effectctl to completion against the daemon ``d``."""
    return subprocess.run([*CTL, *args], env=dict(d.env), capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ctl_popen(d: DaemonHandle, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CTL, *args], env=dict(d.env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def out(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stdout.decode()


def an_id(p: subprocess.CompletedProcess[bytes]) -> str:
    assert p.returncode == 0, p.stderr.decode()
    eid = out(p).strip()
    assert ULID.match(eid), out(p)
    return eid


def running(tmp_path: Path, c: Client, d: DaemonHandle, name: str = "started") -> str:
    """Submit (through effectctl) a shell effect that runs until cancelled; return its id once
    it has certainly started."""
    flag = tmp_path / name
    eid = an_id(ctl(d, "submit", "--", "sh", "-c", f"touch {flag}; exec sleep 60"))
    wait_until(flag.exists, what="the effect to start")
    return eid


# ---- run ------------------------------------------------------------------------------------


def test_run_streams_out_and_err_and_exits_with_the_effects_code(d: DaemonHandle) -> None:
    p = ctl(d, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert p.returncode == 3, p.stderr
    assert p.stdout == b"out\n"
    assert p.stderr == b"err\n"


def test_run_success_and_json(d: DaemonHandle) -> None:
    p = ctl(d, "run", "--json", "--name", "greeting", "--", "printf", "%s", "hi")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"hi")  # the output, then the final record as JSON
    record = json.loads(p.stdout[2:])
    assert record["state"] == "succeeded" and record["exit_code"] == 0
    assert record["name"] == "greeting" and ULID.match(record["id"])


@pytest.mark.parametrize(("args", "code"), [
    (["--", "sh", "-c", "kill -TERM $$"], 128 + 15),
    (["--timeout", "0.3", "--", "sleep", "30"], 124),
    (["--", "/nonexistent/effectd-no-such-program"], 125),
    (["--", "false"], 1),
])
def test_run_exit_codes(d: DaemonHandle, args: list[str], code: int) -> None:
    p = ctl(d, "run", *args)
    assert p.returncode == code, (p.stdout, p.stderr)


def test_run_detach(d: DaemonHandle, c: Client) -> None:
    p = ctl(d, "run", "--detach", "--", "sh", "-c", "echo detached")
    eid = an_id(p)
    rec = c.wait(eid, timeout=15)
    assert rec.state is EffectState.SUCCEEDED
    assert c.output(eid) == b"detached\n"
    p = ctl(d, "run", "-d", "--json", "--", "true")
    assert p.returncode == 0
    assert ULID.match(json.loads(p.stdout)["id"])


def blocked_writing(pid: int) -> bool:
    """Whether the process's main thread sleeps in write(2) on a pipe (its stdout is full)."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        if wchan and wchan != "0":
            return "pipe" in wchan and "write" in wchan
        return Path(f"/proc/{pid}/syscall").read_text().split()[:2] == ["1", "0x1"]  # x86-64
    except OSError:
        return False


def test_ctrl_c_on_run_cancels_the_effect(d: DaemonHandle, c: Client) -> None:
    """SIGINT while effectctl streams: it cancels the effect and exits 130.

    The signal is sent while effectctl is blocked writing the effect's output to its full stdout
    pipe, i.e. between two of its requests to the daemon (see the report on Ctrl-C arriving
    during a request)."""
    name = f"interrupted-{uuid.uuid4().hex}"
    proc = ctl_popen(d, "run", "--name", name, "--", "sh", "-c",
                     "echo ready; head -c 1000000 /dev/zero; exec sleep 60")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # streamed live: the effect runs now
        wait_until(lambda: blocked_writing(proc.pid), what="effectctl to block on its stdout")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for rec in c.list(name=name):  # never leave it running for the module's daemon
            if not rec.final:
                c.cancel(rec.id)
                c.wait(rec.id, timeout=15)
    assert proc.returncode == 130, stderr
    assert b"cancelling" in stderr
    assert set(stdout) == {0}  # the rest of the output up to the cancel, all of it zeros
    [rec] = c.list(name=name)
    assert rec.state is EffectState.CANCELLED
    assert rec.reason == "interrupted"
    assert len(stdout) + len(b"ready\n") <= rec.sizes["stdout"] <= 1_000_006


# ---- submit, status, list, wait -------------------------------------------------------------


@pytest.mark.slow
def test_submit_status_list_json(d: DaemonHandle, c: Client, tmp_path: Path) -> None:
    eid = running(tmp_path, c, d)
    p = ctl(d, "status", eid)
    assert p.returncode == 0
    line = out(p)
    assert line.startswith(eid) and " running " in line
    p = ctl(d, "status", "--json", eid)
    assert p.returncode == 0
    [rec] = json.loads(p.stdout)
    assert rec["id"] == eid and rec["state"] == "running" and rec["kind"] == "shell"
    assert rec["spec"]["argv"][0] == "sh"
    assert eid in out(ctl(d, "list"))
    tag = f"t={uuid.uuid4().hex}"
    p = ctl(d, "submit", "--json", "--label", tag, "--", "true")
    assert p.returncode == 0
    other = json.loads(p.stdout)["id"]
    c.wait(other, timeout=15)
    listed = json.loads(ctl(d, "list", "--label", tag, "--json").stdout)
    assert [r["id"] for r in listed] == [other]
    p = ctl(d, "list", "--state", "running", "--json")
    assert p.returncode == 0
    assert eid in [r["id"] for r in json.loads(p.stdout)]
    assert json.loads(ctl(d, "list", "--state", "running", "--label", tag, "--json").stdout) == []
    c.cancel(eid)
    assert c.wait(eid, timeout=15).state is EffectState.CANCELLED


def test_submit_sleep_and_wait(d: DaemonHandle) -> None:
    eid = an_id(ctl(d, "submit", "--sleep", "0.2"))
    p = ctl(d, "wait", eid)
    assert p.returncode == 0, p.stderr
    assert out(p).startswith(eid) and "succeeded" in out(p)
    p = ctl(d, "wait", "--json", eid)
    assert json.loads(p.stdout)[0]["state"] == "succeeded"


@pytest.mark.slow
def test_wait_any_timeout_and_failure(d: DaemonHandle, c: Client, tmp_path: Path) -> None:
    slow = running(tmp_path, c, d)
    quick = an_id(ctl(d, "submit", "--", "true"))
    p = ctl(d, "wait", "--any", slow, quick)
    assert p.returncode == 0, p.stderr
    assert out(p).startswith(quick) and slow not in out(p)  # only the first finished is printed
    p = ctl(d, "wait", "--timeout", "0.3", slow)
    assert p.returncode == 124
    assert "running" in out(p)
    failing = an_id(ctl(d, "submit", "--", "sh", "-c", "exit 7"))
    p = ctl(d, "wait", failing)
    assert p.returncode == 1
    assert "failed" in out(p) and "exit=7" in out(p)
    p = ctl(d, "wait", quick, failing)  # all: one did not succeed
    assert p.returncode == 1
    c.cancel(slow)
    c.wait(slow, timeout=15)


# ---- logs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_logs(d: DaemonHandle, c: Client) -> None:
    eid = an_id(ctl(d, "submit", "--", "sh", "-c", "echo o1; echo e1 >&2; printf 'o2\\377'"))
    c.wait(eid, timeout=15)
    p = ctl(d, "logs", eid)
    assert p.returncode == 0
    assert p.stdout == b"o1\no2\xff" and p.stderr == b"e1\n"
    assert ctl(d, "logs", "--stdout", eid).stderr == b""
    p = ctl(d, "logs", "--stderr", eid)
    assert (p.stdout, p.stderr) == (b"", b"e1\n")
    assert ctl(d, "logs", "--from-offset", "3", "--stdout", eid).stdout == b"o2\xff"


def test_logs_follow(d: DaemonHandle, c: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    eid = an_id(ctl(d, "submit", "--timeout", "25", "--", "sh", "-c",
                    f"echo first; while [ ! -e {gate} ]; do sleep 0.01; done; echo second; echo e >&2"))
    follower = ctl_popen(d, "logs", "--follow", eid)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"first\n"  # replayed while the effect still runs
        assert c.status(eid).state is EffectState.RUNNING
        gate.touch()
        rest, err = follower.communicate(timeout=20)  # exits by itself once the effect is final
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0
    assert rest == b"second\n" and err == b"e\n"


# ---- result, cancel -------------------------------------------------------------------------


@pytest.mark.slow
def test_result_json_of_python_effect(d: DaemonHandle, c: Client) -> None:
    eid = an_id(ctl(d, "submit", "--python", "effectd_test_effects:echo", "--args", '[2, "x"]',
                    "--kwargs", '{"k": [1]}'))
    c.wait(eid, timeout=15)
    p = ctl(d, "result", eid, "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["id"] == eid and rec["state"] == "succeeded"
    assert rec["result"] == {"args": [2, "x"], "kwargs": {"k": [1]}}
    p = ctl(d, "result", eid)
    assert p.returncode == 0
    assert json.loads(out(p).splitlines()[1]) == {"args": [2, "x"], "kwargs": {"k": [1]}}
    bad = an_id(ctl(d, "submit", "--python", "effectd_test_effects:boom", "--args", '["no"]'))
    c.wait(bad, timeout=15)
    p = ctl(d, "result", bad)
    assert p.returncode == 1
    assert b"ValueError: no" in p.stderr
    assert json.loads(ctl(d, "result", "--json", bad).stdout)["error"]["message"] == "no"


@pytest.mark.slow
def test_cancel(d: DaemonHandle, c: Client, tmp_path: Path) -> None:
    eid = running(tmp_path, c, d)
    p = ctl(d, "cancel", eid)
    assert p.returncode == 0, p.stderr
    assert out(p).split() == [eid, "cancelling"]
    assert c.wait(eid, timeout=15).state is EffectState.CANCELLED
    p = ctl(d, "cancel", "--json", eid)  # already final: nothing to do
    assert p.returncode == 0
    assert json.loads(p.stdout) == [{"id": eid, "state": "cancelled", "cancelled": False}]
    assert "cancelled" in out(ctl(d, "status", eid))


# ---- error exit codes -----------------------------------------------------------------------


@pytest.mark.parametrize("args", [["status", UNKNOWN_ID], ["result", UNKNOWN_ID], ["logs", UNKNOWN_ID],
                                  ["cancel", UNKNOWN_ID], ["wait", UNKNOWN_ID],
                                  ["logs", "--follow", UNKNOWN_ID]])
def test_unknown_id_exits_4(d: DaemonHandle, args: list[str]) -> None:
    p = ctl(d, *args)
    assert p.returncode == 4, (p.stdout, p.stderr)
    assert UNKNOWN_ID in p.stderr.decode()


def test_result_of_running_exits_5(d: DaemonHandle, c: Client, tmp_path: Path) -> None:
    eid = running(tmp_path, c, d)
    p = ctl(d, "result", eid)
    assert p.returncode == 5, (p.stdout, p.stderr)
    assert b"running" in p.stderr
    c.cancel(eid)
    c.wait(eid, timeout=15)


@pytest.mark.parametrize("args", [["run"], ["status"], ["submit"], ["list", "--limit", "many"],
                                  ["wait", "--timeout", "soon", UNKNOWN_ID], ["frobnicate"]])
def test_usage_errors_exit_2(d: DaemonHandle, args: list[str]) -> None:
    p = ctl(d, *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr


@pytest.mark.parametrize("cmd", ["run", "submit"])
def test_misspelled_option_is_a_usage_error(d: DaemonHandle, c: Client, cmd: str) -> None:
    before = len(c.list(limit=10_000))
    p = ctl(d, cmd, "--tmeout", "5", "--", "true")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert len(c.list(limit=10_000)) == before  # nothing was submitted


# ---- daemon status / stop -------------------------------------------------------------------


@pytest.mark.slow
def test_daemon_status_and_stop(daemon: DaemonHandle) -> None:
    p = ctl(daemon, "daemon", "status")
    assert p.returncode == 0, p.stderr
    assert f"pid {daemon.pid}" in out(p) and "running" in out(p)
    info = json.loads(ctl(daemon, "daemon", "status", "--json").stdout)
    assert info["running"] is True and info["pid"] == daemon.pid
    assert info["runtime_dir"] == str(daemon.runtime)
    assert daemon.worker_processes()  # a warm worker exists before the stop
    p = ctl(daemon, "daemon", "stop")
    assert p.returncode == 0, p.stderr
    assert f"stopped (pid {daemon.pid})" in out(p)
    assert daemon.proc is not None
    assert daemon.proc.wait(20) == 0  # it exited cleanly...
    assert not daemon.survivors(grace=10)  # ...and no worker or effect outlived it
    p = ctl(daemon, "daemon", "status")
    assert p.returncode == 3
    assert "not running" in out(p)
    assert json.loads(ctl(daemon, "daemon", "status", "--json").stdout)["running"] is False
    p = ctl(daemon, "daemon", "stop")  # stopping a stopped daemon is not an error
    assert p.returncode == 0 and "not running" in out(p)


@pytest.mark.slow
def test_daemon_stop_now_ends_running_effects(daemon: DaemonHandle, tmp_path: Path) -> None:
    c = daemon.client()
    eid = running(tmp_path, c, daemon)
    root = wait_until(lambda: c.status(eid).pid, what="the effect's pid")
    p = ctl(daemon, "daemon", "stop", "--now")
    assert p.returncode == 0, p.stderr
    assert daemon.proc is not None and daemon.proc.wait(30) == 0
    assert not psutil.pid_exists(root) or psutil.Process(root).status() == psutil.STATUS_ZOMBIE
    assert not daemon.survivors(grace=10)
    con = sqlite3.connect(daemon.state / "journal.sqlite3")
    try:
        [(state, blob)] = con.execute("SELECT state, record FROM effects WHERE id = ?", (eid,))
    finally:
        con.close()
    assert state == "lost"  # it did not finish on its own: the daemon stopped it
    assert msgpack.unpackb(blob, raw=False)["reason"] == "daemon_stopped"
