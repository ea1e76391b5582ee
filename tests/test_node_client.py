"""The Node.js client (clients/node, written from docs/protocol.md alone) against a real daemon.

Runs ``node clients/node/test/stream_test.js`` with the daemon's environment: hello, a shell
effect ``seq 1 10000`` followed live and checked byte for byte, its final state, late joins on
finished effects, and a live follow through a one-message SUB queue that forces gap fills.
Also runs the client's unit tests of the gap-fill loop (``node --test``, no daemon).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
NODE_CLIENT = REPO / "clients" / "node"
NEEDED_MODULES = ("zeromq", "@msgpack/msgpack")


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)  # never skipped in CI
    pytest.skip(message)


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node/npm not found: install Node.js >= 18 with npm (apt-get install nodejs npm)")
    assert node is not None and npm is not None
    modules = NODE_CLIENT / "node_modules"
    if not all((modules / name / "package.json").exists() for name in NEEDED_MODULES):
        try:
            proc = subprocess.run([npm, "ci", "--prefix", str(NODE_CLIENT), "--no-audit", "--no-fund"],
                                  cwd=REPO, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("npm ci --prefix clients/node did not finish within 180 s")
        if proc.returncode != 0:
            pytest.fail(f"npm ci --prefix clients/node failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return node


@pytest.mark.timeout(120)
def test_node_client_gap_fill_unit(node: str) -> None:
    """The §9 loop driven by scripted live messages and an in-memory store, and the §1.1 runtime
    dir checks (no daemon)."""
    proc = subprocess.run(
        [node, "--test", str(NODE_CLIENT / "test" / "follow_unit_test.js"),
         str(NODE_CLIENT / "test" / "runtime_dir_unit_test.js")],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "# fail 0" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_node_client_streams_exactly(node: str, daemon: Any) -> None:
    proc = subprocess.run([node, str(NODE_CLIENT / "test" / "stream_test.js")], cwd=REPO, env=daemon.env,
                          capture_output=True, text=True, timeout=270)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\ndaemon log:\n{daemon.log()}"
    assert lines, f"no output from the node test\n{context}"
    result = json.loads(lines[-1])
    assert proc.returncode == 0 and result.get("ok") is True, context

    assert result["protocol"] == 1
    assert isinstance(result["id"], str) and len(result["id"]) == 26
    expected = "".join(f"{i}\n" for i in range(1, 10001)).encode()
    assert result["stdout_bytes"] == len(expected)
    assert result["stdout_exact"] is True
    assert result["state"] == "succeeded"
    assert result["exit_code"] == 0
    assert result["late_join"] is True
    assert result["live_bytes"] + result["store_bytes"] == len(expected)
    assert result["lossy_bytes"] == len("".join(f"{i}\n" for i in range(1, 3000001)))
    assert result["lossy_live_bytes"] + result["lossy_store_bytes"] == result["lossy_bytes"]
    assert result["error_code"] == "not_found"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_node_followers_retry_busy_reads(node: str, daemon_factory: Any) -> None:
    """20 Node followers while the daemon's read budget is tiny: reads are answered ``busy``
    (protocol.md §5.9) and the client retries them transparently; every follower is exact."""
    d = daemon_factory("--kill-grace", "1", env={"EFFECTD_READ_INFLIGHT": str(512 * 1024)})
    proc = subprocess.run([node, str(NODE_CLIENT / "test" / "busy_test.js"), "20", "4000000"], cwd=REPO,
                          env=d.env, capture_output=True, text=True, timeout=170)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\ndaemon log:\n{d.log()}"
    assert lines and json.loads(lines[-1]).get("ok") is True, context
    with d.client() as c:
        assert c.hello()["read_busy"] > 0, "no read was answered busy: the test did not test busy"
