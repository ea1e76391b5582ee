"""Documented limits hold at the edges: oversized requests and results, cwd isolation."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
import zmq

from effectd.client import EffectState
from tests.conftest import DaemonHandle


@pytest.fixture
def daemon(shared_daemon: DaemonHandle) -> DaemonHandle:
    """These tests need only *a* daemon (each checks it still serves afterwards): they share one."""
    return shared_daemon


@pytest.mark.parametrize("target,args", [("effectd_test_effects:huge_string", [9]),
                                         ("effectd_test_effects:int_keys", [])])
def test_python_result_the_daemon_cannot_accept_fails_cleanly(client: Any, target: str, args: list[Any]) -> None:
    rec = client.wait(client.submit_python(target, args), timeout=30)
    assert rec.state is EffectState.FAILED
    assert rec.error is not None and rec.error.message
    # The worker is still usable afterwards.
    assert client.wait(client.submit_python("effectd_test_effects:add", [1, 1]), timeout=30).result == 2


def test_request_over_the_limit_gets_too_large(daemon: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{daemon.runtime}/control.sock")
    try:
        body = msgpack.packb({"v": 1, "rid": 1, "op": "hello", "client": "x" * (17 * 1024 * 1024)})
        sock.send(body)
        assert sock.poll(20000)
        reply = msgpack.unpackb(sock.recv())
        assert reply["ok"] is False and reply["error"]["code"] == "too_large"
    finally:
        sock.close()
        ctx.term()
    assert daemon.client().hello()["pid"] == daemon.pid


def test_python_effect_cwd_does_not_leak_into_the_worker(client: Any, tmp_path: Any) -> None:
    first = client.wait(client.submit_python("effectd_test_effects:cwd", cwd=str(tmp_path)))
    assert first.result == str(tmp_path)
    second = client.wait(client.submit_python("effectd_test_effects:cwd", cwd="/"))
    assert second.result == "/"
    shell = client.submit_shell("pwd", cwd=os.getcwd())
    client.wait(shell)
    assert client.output(shell).strip().decode() == os.getcwd()
