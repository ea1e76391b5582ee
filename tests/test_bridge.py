"""The JSON-lines stdio bridge, as a real subprocess speaking to a real daemon."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import DaemonHandle

SEQ_10K = b"".join(b"%d\n" % i for i in range(1, 10_001))


class BridgeProc:
    """``python -m effectd.bridge`` with its stdout parsed line by line in a thread."""

    def __init__(self, daemon: Any, *args: str, argv: list[str] | None = None) -> None:
        cmd = argv or [sys.executable, "-m", "effectd.bridge", "--stdio", "--no-autostart"]
        self.proc = subprocess.Popen([*cmd, *args], env=daemon.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.raw: list[bytes] = []
        self.messages: list[dict[str, Any]] = []
        self.stderr = b""
        self.cond = threading.Condition()
        self.stdout_closed = False
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.raw.append(line)
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = {"unparsable": line.decode(errors="replace")}
                self.messages.append(msg)
                self.cond.notify_all()
        with self.cond:
            self.stdout_closed = True
            self.cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def send(self, request: dict[str, Any] | bytes) -> None:
        assert self.proc.stdin is not None
        data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def find(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.messages:
                    if pred(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0 or self.stdout_closed:
                    raise AssertionError(f"no matching line; got {self.messages[-5:]}, "
                                         f"stderr {self.stderr[-2000:]!r}")
                self.cond.wait(left)

    def reply(self, request_id: Any, timeout: float = 20.0) -> dict[str, Any]:
        return self.find(lambda m: "event" not in m and m.get("id") == request_id, timeout)

    def call(self, request: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
        self.send(request)
        return self.reply(request["id"], timeout)

    def end_event(self, sub: Any, timeout: float = 30.0) -> dict[str, Any]:
        return self.find(lambda m: m.get("event") == "end" and m.get("subscription") == sub, timeout)

    def chunks(self, sub: Any) -> list[dict[str, Any]]:
        with self.cond:
            return [m for m in self.messages if m.get("event") == "chunk" and m.get("subscription") == sub]

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        return rc

    def assert_only_json_lines(self) -> None:
        with self.cond:
            for line in self.raw:
                assert line.endswith(b"\n"), line[:200]
                assert isinstance(json.loads(line), dict), line[:200]


@pytest.fixture
def daemon(shared_daemon: DaemonHandle) -> DaemonHandle:
    """No test here needs a fresh daemon or stops it: they share the module's (one start, not 14);
    conftest still checks, after the last one, that nothing any of them started survives."""
    return shared_daemon


@pytest.fixture
def bridge(daemon: Any) -> Iterator[Callable[..., BridgeProc]]:
    procs: list[BridgeProc] = []

    def start(*args: str, argv: list[str] | None = None) -> BridgeProc:
        b = BridgeProc(daemon, *args, argv=argv)
        procs.append(b)
        return b

    yield start
    for b in procs:
        if b.proc.poll() is None:
            b.proc.kill()
            b.proc.wait(10)
    cancel_leftovers(daemon)


def cancel_leftovers(daemon: Any) -> None:
    """Cancel what a failed test left running: workers and effects outlive a stopped daemon."""
    with contextlib.suppress(Exception):
        c = daemon.client(timeout=2, retries=0)
        ids = [r.id for r in c.list(states=["queued", "running"], limit=10_000)]
        if ids:
            c.cancel(*ids)
            c.wait_many(ids, timeout=20)


def reassemble(chunks: list[dict[str, Any]], stream: str = "stdout") -> bytes:
    out = bytearray()
    for ch in chunks:
        if ch["stream"] != stream:
            continue
        data = ch["data"].encode() if ch["encoding"] == "utf-8" else base64.b64decode(ch["data"])
        assert ch["offset"] == len(out), "a gap or an overlap"
        out += data
    return bytes(out)


def test_hello_submit_subscribe_wait_and_clean_eof(bridge: Any, daemon: Any) -> None:
    b = bridge()
    hello = b.call({"id": 1, "op": "hello"})
    assert hello["ok"] is True and hello["protocol"] == 1 and hello["bridge"]["protocol"] == 1
    sub = b.call({"id": 2, "op": "submit",
                  "effect": {"kind": "shell", "command": "seq 1 10000", "cwd": "/"}})
    assert sub["ok"] is True
    eid = sub["effect"]
    ack = b.call({"id": "s1", "op": "subscribe", "effect": eid, "streams": ["stdout"]})
    assert ack == {"id": "s1", "ok": True, "subscription": "s1"}
    waited = b.call({"id": {"any": ["json"]}, "op": "wait", "ids": [eid], "timeout": 20})
    assert waited["ok"] is True and waited["timed_out"] is False
    assert waited["effects"][0]["state"] == "succeeded"
    end = b.end_event("s1")
    assert (end["cause"], end["state"], end["exit_code"], end["effect"]) == ("final", "succeeded", 0, eid)
    assert reassemble(b.chunks("s1")) == SEQ_10K
    # The end event is the subscription's last line.
    with b.cond:
        tagged = [m for m in b.messages if m.get("subscription") == "s1" and "event" in m]
    assert tagged[-1] is end
    b.close_stdin()
    assert b.wait() == 0
    b.assert_only_json_lines()


def test_malformed_lines_are_answered_and_the_bridge_keeps_running(bridge: Any) -> None:
    b = bridge()
    b.send(b"this is not json\n")
    err = b.find(lambda m: m.get("ok") is False)
    assert err["id"] is None and err["error"]["code"] == "bad_request"
    assert b.call({"id": 1, "op": "hello"})["ok"] is True
    b.send(b"[1, 2]\n")
    b.send(b"\xff\xfe{}\n")
    b.send(b"\n   \n")  # blank lines: ignored
    b.send(b'{"id": "x", "op": 5}\n')
    b.send({"id": "y", "op": "frobnicate"})
    b.send({"id": "z", "op": "status", "ids": ["nope"]})
    b.send({"id": "u", "op": "status", "ids": ["0" * 26], "extra": 1})
    b.send({"id": "r", "op": "status", "ids": ["0" * 26], "rid": 1})
    b.send({"id": "n", "op": "status", "ids": ["0" * 26]})
    b.send({"id": "s", "op": "subscribe", "effect": "0" * 26, "streams": ["stdin"]})
    assert b.reply("x")["error"]["code"] == "bad_request"
    assert b.reply("y")["error"]["code"] == "unknown_op"
    assert b.reply("z")["error"]["code"] == "bad_request"
    assert "extra" in b.reply("u")["error"]["message"]
    assert b.reply("r")["error"]["code"] == "bad_request"
    assert b.reply("n")["error"]["code"] == "not_found"
    assert b.reply("s")["error"]["code"] == "bad_request"
    assert b.call({"id": 2, "op": "hello"})["ok"] is True
    with b.cond:
        nulls = [m for m in b.messages if m.get("id") is None]
    assert len(nulls) == 3 and all(m["error"]["code"] == "bad_request" for m in nulls)
    b.close_stdin()
    assert b.wait() == 0
    b.assert_only_json_lines()


def test_a_long_wait_does_not_block_other_requests(bridge: Any) -> None:
    b = bridge()
    eid = b.call({"id": 1, "op": "submit", "effect": {"kind": "sleep", "seconds": 60}})["effect"]
    b.send({"id": "long", "op": "wait", "ids": [eid], "timeout": 30})
    t0 = time.monotonic()
    assert b.call({"id": "quick", "op": "hello"})["ok"] is True
    assert b.call({"id": "st", "op": "status", "ids": [eid]})["effects"][0]["state"] in ("queued", "running")
    assert time.monotonic() - t0 < 10
    with b.cond:
        assert not any(m.get("id") == "long" for m in b.messages)
    assert b.call({"id": "c", "op": "cancel", "ids": [eid]})["ok"] is True
    long = b.reply("long")
    assert long["ok"] is True and long["effects"][0]["state"] == "cancelled"
    ids = [m.get("id") for m in b.messages]
    assert ids.index("quick") < ids.index("long")
    b.close_stdin()
    assert b.wait() == 0


def test_read_output_and_result_encode_bytes(bridge: Any) -> None:
    b = bridge()
    eid = b.call({"id": 1, "op": "submit", "effect": {"kind": "shell", "argv": [
        "sh", "-c", r"printf 'h\303\251\n'; printf '\377\376' >&2"]}})["effect"]
    assert b.call({"id": 2, "op": "wait", "ids": [eid]})["effects"][0]["state"] == "succeeded"
    # Ops whose wire field 'id' names the effect take it as 'effect' (the request owns 'id').
    out = b.call({"id": 3, "op": "read_output", "effect": eid, "stream": "stdout"})
    assert (out["ok"], out["effect"], out["data"], out["encoding"]) == (True, eid, "h\u00e9\n", "utf-8")
    assert (out["offset"], out["next_offset"], out["size"], out["eof"]) == (0, 4, 4, True)
    err = b.call({"id": 4, "op": "read_output", "effect": eid, "stream": "stderr", "offset": 0})
    assert (err["encoding"], base64.b64decode(err["data"])) == ("base64", b"\xff\xfe")
    assert b.call({"id": 5, "op": "result", "effect": eid})["exit_code"] == 0
    py = b.call({"id": 6, "op": "submit", "effect": {
        "kind": "python", "target": "effectd_test_effects:echo", "args": ["x"]}})["effect"]
    b.call({"id": 7, "op": "wait", "ids": [py]})
    assert b.call({"id": 8, "op": "result", "effect": py})["result"] == {"args": ["x"], "kwargs": {}}
    b.close_stdin()
    assert b.wait() == 0
    b.assert_only_json_lines()


def test_unsubscribe_ends_the_subscription_before_its_reply(bridge: Any) -> None:
    b = bridge()
    eid = b.call({"id": 1, "op": "submit", "effect": {
        "kind": "shell", "command": "echo first; sleep 60"}})["effect"]
    assert b.call({"id": "s", "op": "subscribe", "effect": eid})["ok"] is True
    first = b.find(lambda m: m.get("event") == "chunk" and m.get("subscription") == "s")
    assert (first["stream"], first["offset"], first["data"]) == ("stdout", 0, "first\n")
    b.send({"id": "s", "op": "subscribe", "effect": eid})
    dup = b.find(lambda m: m.get("id") == "s" and m.get("ok") is False)
    assert dup["error"]["code"] == "bad_request"
    un = b.call({"id": "u", "op": "unsubscribe", "subscription": "s"})
    assert un == {"id": "u", "ok": True, "subscription": "s"}
    end = b.end_event("s", timeout=1)
    assert end["cause"] == "unsubscribed" and end["state"] is None
    assert b.messages.index(end) < b.messages.index(un)
    again = b.call({"id": "u2", "op": "unsubscribe", "subscription": "s"})
    assert again["error"]["code"] == "not_found"
    # A subscription to an unknown effect is acknowledged, then ends with an error.
    assert b.call({"id": "x", "op": "subscribe", "effect": "0" * 26})["ok"] is True
    gone = b.end_event("x")
    assert (gone["cause"], gone["error"]["code"]) == ("error", "not_found")
    b.call({"id": 9, "op": "cancel", "ids": [eid]})
    b.close_stdin()
    assert b.wait() == 0
    b.assert_only_json_lines()


def test_eof_finishes_requests_in_flight_and_the_stream_they_outlive(bridge: Any, daemon: Any) -> None:
    # Everything written at once, then EOF: the bridge still answers all of it.
    c = daemon.client()
    eid = c.submit_shell("sleep 0.3; seq 1 10000")
    b = bridge()
    b.send(b"".join(json.dumps(r).encode() + b"\n" for r in (
        {"id": "s", "op": "subscribe", "effect": eid, "streams": ["stdout"]},
        {"id": "w", "op": "wait", "ids": [eid], "timeout": 20},
    )))
    b.close_stdin()
    assert b.wait() == 0
    assert b.reply("w", timeout=0)["effects"][0]["state"] == "succeeded"
    assert b.end_event("s", timeout=0)["cause"] == "final"
    assert reassemble(b.chunks("s")) == SEQ_10K
    b.assert_only_json_lines()


def test_eof_ends_open_subscriptions_after_the_grace(bridge: Any, daemon: Any) -> None:
    c = daemon.client()
    eid = c.submit_shell("sleep 60")
    b = bridge("--eof-grace", "0.2")
    assert b.call({"id": "s", "op": "subscribe", "effect": eid})["ok"] is True
    t0 = time.monotonic()
    b.close_stdin()
    assert b.wait() == 0
    assert time.monotonic() - t0 < 10
    assert b.end_event("s", timeout=0)["cause"] == "closed"
    c.cancel(eid)


def test_sigterm_cancels_everything_and_each_gets_its_last_line(bridge: Any, daemon: Any) -> None:
    c = daemon.client()
    eid = c.submit_shell("sleep 60")
    b = bridge()
    assert b.call({"id": "s", "op": "subscribe", "effect": eid})["ok"] is True
    b.send({"id": "w", "op": "wait", "ids": [eid], "timeout": 30})
    time.sleep(0.3)  # let the wait reach the daemon (load shaping; the test holds either way)
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait() == 128 + signal.SIGTERM
    assert b.reply("w", timeout=0)["error"]["code"] == "cancelled"
    assert b.end_event("s", timeout=0)["cause"] == "closed"
    b.assert_only_json_lines()
    c.cancel(eid)


def test_stray_writes_to_stdout_never_reach_the_protocol(bridge: Any) -> None:
    # Something in the process printing, or writing to fd 1 directly, lands on stderr.
    code = ("import os, effectd.bridge as b\n"
            "orig = b.Bridge.handle_line\n"
            "def noisy(self, raw):\n"
            "    print('stray print')\n"
            "    os.write(1, b'stray fd write\\n')\n"
            "    return orig(self, raw)\n"
            "b.Bridge.handle_line = noisy\n"
            "b.main()\n")
    b = bridge("--log-level", "DEBUG", argv=[sys.executable, "-c", code, "--stdio", "--no-autostart"])
    assert b.call({"id": 1, "op": "hello"})["ok"] is True
    b.close_stdin()
    assert b.wait() == 0
    b.assert_only_json_lines()
    assert len(b.raw) == 1
    assert b"stray print" in b.stderr and b"stray fd write" in b.stderr


def test_run_bridge_in_process_with_in_memory_streams(daemon: Any) -> None:
    from effectd.bridge import run_bridge

    eid = daemon.client().submit_shell("printf abc")
    lines = [{"id": 1, "op": "wait", "ids": [eid], "timeout": 20},
             {"id": 2, "op": "subscribe", "effect": eid, "from_offset": 1}]
    stdin = io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in lines) + b"{oops")
    stdout = io.StringIO()
    status = asyncio.run(run_bridge(stdin, stdout, runtime=daemon.runtime, state=daemon.state,
                                    autostart=False))
    assert status == 0
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    bad = [m for m in out if "event" not in m and m["id"] is None]
    assert [m["error"]["code"] for m in bad] == ["bad_request"]  # the last, unterminated line
    chunks = [m for m in out if m.get("event") == "chunk"]
    assert [(m["stream"], m["offset"], m["data"]) for m in chunks] == [("stdout", 1, "bc")]
    assert next(m for m in out if m.get("event") == "end")["state"] == "succeeded"
    assert next(m for m in out if m.get("id") == 1)["effects"][0]["state"] == "succeeded"


def test_over_long_line_is_refused_and_skipped() -> None:
    from effectd.bridge import read_lines

    async def collect() -> list[bytes | None]:
        data = b"short\n" + b"x" * 50 + b"\nafter\nlast"
        return [line async for line in read_lines(io.BytesIO(data), max_line=20)]

    assert asyncio.run(collect()) == [b"short", None, b"after", b"last"]


def test_stdin_from_dev_null_or_a_file_ends_cleanly(daemon: Any, tmp_path: Any) -> None:
    # /dev/null is a character device epoll refuses; a regular file neither: both are read in a
    # thread, and EOF ends the bridge with 0.
    cmd = [sys.executable, "-m", "effectd.bridge", "--no-autostart"]
    done = subprocess.run(cmd, env=daemon.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, b"")
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": 1, "op": "groups"}\n{"id": 2, "op": "hello"}')
    with open(requests, "rb") as f:
        done = subprocess.run(cmd, env=daemon.env, stdin=f, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    replies = {m["id"]: m for m in map(json.loads, done.stdout.splitlines())}
    assert replies[1]["ok"] is True and replies[2]["ok"] is True


def test_closed_stdout_stops_the_bridge_with_status_1(daemon: Any) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "effectd.bridge", "--no-autostart"], env=daemon.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"id": 1, "op": "groups"}\n')
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["id"] == 1
    proc.stdout.close()  # the reader goes away; stdin stays open
    proc.stdin.write(b'{"id": 2, "op": "groups"}\n')
    proc.stdin.flush()
    try:
        assert proc.wait(30) == 1
    finally:
        proc.kill()
        proc.stdin.close()
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert b"stdout is closed" in stderr


def test_click_command_in_process(daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from effectd.bridge import bridge as command

    monkeypatch.setenv("EFFECTD_RUNTIME_DIR", str(daemon.runtime))
    monkeypatch.setenv("EFFECTD_STATE_DIR", str(daemon.state))
    result = CliRunner().invoke(command, ["--stdio", "--no-autostart"],
                                input='{"id": "g", "op": "groups"}\nnot json\n')
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((m["id"] or "", m["ok"]) for m in lines) == [("", False), ("g", True)]
