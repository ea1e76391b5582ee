"""The daemon under a (simulated) systemd: sd_notify datagrams to $NOTIFY_SOCKET, path and abstract."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import pytest


def _collect_until(sock: socket.socket, predicate: Any, timeout: float) -> list[str]:
    """Receive notify datagrams until ``predicate(messages)`` holds (bounded by ``timeout``)."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if predicate(messages):
            return messages
    raise AssertionError(f"notify messages never satisfied the condition: {messages}")


def _run_notify_scenario(daemon_factory: Any, address: str, bind_to: str | bytes) -> list[str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(bind_to)
    try:
        d = daemon_factory(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}, start=False)
        d.start(wait=False)
        msgs = _collect_until(sock, lambda m: any("READY=1" in x for x in m), 20)
        # READY=1 is sent only once the control socket answers: a hello right now succeeds
        # on the first try, without any retry.
        with d.client(timeout=2.0, retries=0) as c:
            info = c.hello()
            assert info["managed_by"] == "systemd"
            assert info["workers"]
        msgs += _collect_until(sock, lambda m: sum("WATCHDOG=1" in x for x in m) >= 3, 10)
        msgs += _collect_until(sock, lambda m: any(x.startswith("STATUS=") or "\nSTATUS=" in x for x in msgs + m), 10)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        msgs += _collect_until(sock, lambda m: any("STOPPING=1" in x for x in m), 10)
        assert d.proc.wait(30) == 0
        # Children must not inherit the notify socket (they would confuse systemd).
        return msgs
    finally:
        sock.close()


@pytest.mark.slow
def test_notify_ready_watchdog_status_stopping_path_socket(daemon_factory: Any) -> None:
    path = f"/tmp/ed-notify-{os.getpid()}-{time.monotonic_ns()}.sock"
    try:
        msgs = _run_notify_scenario(daemon_factory, path, path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    ready_index = next(i for i, m in enumerate(msgs) if "READY=1" in m)
    assert "MAINPID=" in msgs[ready_index]
    assert any("STATUS=" in m and "running" in m for m in msgs)


@pytest.mark.slow
def test_notify_abstract_socket(daemon_factory: Any) -> None:
    name = f"effectd-test-{os.getpid()}-{time.monotonic_ns()}"
    msgs = _run_notify_scenario(daemon_factory, "@" + name, "\0" + name)
    assert any("READY=1" in m for m in msgs)
    assert any("STOPPING=1" in m for m in msgs)


@pytest.mark.slow
def test_workers_do_not_inherit_notify_socket(daemon_factory: Any) -> None:
    name = f"effectd-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        d = daemon_factory(env={"NOTIFY_SOCKET": "@" + name})
        c = d.client()
        eid = c.submit_shell("echo ${NOTIFY_SOCKET:-unset}", inherit_env=False)
        c.wait(eid)
        assert c.output(eid) == b"unset\n"
        for p in d.worker_processes():
            assert "NOTIFY_SOCKET" not in p.environ()
    finally:
        sock.close()
