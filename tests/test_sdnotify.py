"""SystemdNotifier against a real AF_UNIX datagram socket standing in for systemd.

Time is driven through ``now=``; nothing sleeps. A datagram sent on an AF_UNIX socket is in
the receiver's queue when ``sendto`` returns, so "nothing was sent" is checked with a
non-blocking receive, and "something was sent" with a receive under a timeout.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from effectd.daemon.sdnotify import RETRY_INTERVAL, STATUS_MIN_INTERVAL, SystemdNotifier


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address = address
        self.env_value = env_value

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def recv(self) -> dict[str, str]:
        """The next message as a dict; fails if none arrives within 5 s."""
        self.sock.settimeout(5.0)
        data = self.sock.recv(65536)
        lines = data.decode("utf-8").split("\n")
        message = dict(line.split("=", 1) for line in lines)
        assert len(message) == len(lines), f"duplicate keys in {data!r}"
        return message

    def assert_silent(self) -> None:
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        pytest.fail(f"unexpected notification {data!r}")

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("\0"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = str(tmp_path / "notify.sock")
    fake = FakeSystemd(path, path)
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"effectd-test-{secrets.token_hex(8)}"
    fake = FakeSystemd("\0" + name, "@" + name)
    yield fake
    fake.close()


PID = 4242


def notifier_for(fake: FakeSystemd, **extra: str) -> SystemdNotifier:
    return SystemdNotifier.from_environ(fake.environ(**extra), pid=PID)


# -- ready / mainpid --------------------------------------------------------------------


def test_ready_sends_ready_and_mainpid(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    assert systemd.recv() == {"READY": "1", "MAINPID": str(PID)}
    systemd.assert_silent()


def test_ready_with_status_over_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    notifier = notifier_for(abstract_systemd)
    assert notifier.enabled
    notifier.ready("listening\non 2 sockets")
    assert abstract_systemd.recv() == {
        "READY": "1",
        "STATUS": "listening on 2 sockets",  # a newline would start a new assignment
        "MAINPID": str(PID),
    }


def test_pid_defaults_to_our_own(systemd: FakeSystemd) -> None:
    notifier = SystemdNotifier.from_environ(systemd.environ())
    notifier.ready()
    assert systemd.recv()["MAINPID"] == str(os.getpid())


# -- status: change-only and rate-limited -------------------------------------------------


def test_status_sent_only_when_changed(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.status("idle", now=100.0)
    assert systemd.recv() == {"STATUS": "idle"}
    notifier.status("idle", now=200.0)
    notifier.tick(now=300.0)
    systemd.assert_silent()
    notifier.status("2 running", now=400.0)
    assert systemd.recv() == {"STATUS": "2 running"}


def test_status_rate_limited_latest_pending_sent_by_tick(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.status("1 running", now=100.0)
    assert systemd.recv() == {"STATUS": "1 running"}

    notifier.status("2 running", now=100.2)
    notifier.status("3 running", now=100.4)
    systemd.assert_silent()  # too soon after the last send
    notifier.tick(now=100.9)
    systemd.assert_silent()  # still inside the interval

    notifier.tick(now=100.0 + STATUS_MIN_INTERVAL)
    assert systemd.recv() == {"STATUS": "3 running"}  # only the latest, once
    notifier.tick(now=105.0)
    systemd.assert_silent()


def test_status_change_after_interval_is_sent_at_once(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.status("a", now=10.0)
    assert systemd.recv() == {"STATUS": "a"}
    notifier.status("b", now=11.5)
    assert systemd.recv() == {"STATUS": "b"}


def test_pending_status_dropped_when_text_reverts(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.status("idle", now=10.0)
    assert systemd.recv() == {"STATUS": "idle"}
    notifier.status("busy", now=10.1)
    notifier.status("idle", now=10.2)  # what systemd already shows
    notifier.tick(now=20.0)
    systemd.assert_silent()


def test_ready_status_counts_for_rate_limit_and_dedup(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.ready("idle", now=50.0)
    systemd.recv()
    notifier.status("idle", now=60.0)
    systemd.assert_silent()
    notifier.status("busy", now=50.5)
    systemd.assert_silent()
    notifier.tick(now=51.0)
    assert systemd.recv() == {"STATUS": "busy"}


# -- watchdog -----------------------------------------------------------------------------


def test_watchdog_cadence(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(PID))
    assert notifier.watchdog_interval == 15.0

    notifier.tick(now=1000.0)  # first tick pings at once
    assert systemd.recv() == {"WATCHDOG": "1"}
    for t in (1000.1, 1005.0, 1014.999):
        notifier.tick(now=t)
    systemd.assert_silent()
    notifier.tick(now=1015.0)
    assert systemd.recv() == {"WATCHDOG": "1"}
    notifier.tick(now=1020.0)
    systemd.assert_silent()
    notifier.tick(now=1031.0)  # a late iteration pings and restarts the cadence from there
    assert systemd.recv() == {"WATCHDOG": "1"}
    notifier.tick(now=1045.0)
    systemd.assert_silent()
    notifier.tick(now=1046.0)
    assert systemd.recv() == {"WATCHDOG": "1"}


def test_watchdog_without_watchdog_pid(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd, WATCHDOG_USEC="2000000")
    assert notifier.watchdog_interval == 1.0
    notifier.tick(now=0.0)
    assert systemd.recv() == {"WATCHDOG": "1"}


def test_tick_sends_watchdog_and_pending_status_separately(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd, WATCHDOG_USEC="10000000")
    notifier.status("a", now=0.0)
    assert systemd.recv() == {"STATUS": "a"}
    notifier.status("b", now=0.5)
    notifier.tick(now=1.0)
    assert systemd.recv() == {"WATCHDOG": "1"}
    assert systemd.recv() == {"STATUS": "b"}


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID + 1)},  # someone else's
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"},
        {},
    ],
)
def test_watchdog_disabled(systemd: FakeSystemd, extra: dict[str, str]) -> None:
    notifier = notifier_for(systemd, **extra)
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    for t in (0.0, 100.0, 10_000.0):
        notifier.tick(now=t)
    notifier.watchdog_ping()
    systemd.assert_silent()


# -- stopping, extend_timeout, raw --------------------------------------------------------


def test_stopping(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.stopping()
    assert systemd.recv() == {"STOPPING": "1"}
    notifier.stopping("draining 3 effects")
    assert systemd.recv() == {"STOPPING": "1", "STATUS": "draining 3 effects"}


def test_stopping_status_bypasses_rate_limit_and_clears_pending(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.status("busy", now=1.0)
    systemd.recv()
    notifier.status("busier", now=1.1)
    notifier.stopping("draining", now=1.2)
    assert systemd.recv() == {"STOPPING": "1", "STATUS": "draining"}
    notifier.tick(now=5.0)
    systemd.assert_silent()


def test_extend_timeout(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.extend_timeout(20)
    assert systemd.recv() == {"EXTEND_TIMEOUT_USEC": "20000000"}
    notifier.extend_timeout(0.25)
    assert systemd.recv() == {"EXTEND_TIMEOUT_USEC": "250000"}
    with pytest.raises(ValueError):
        notifier.extend_timeout(0)


def test_notify_raw(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    assert notifier.notify("RELOADING=1", "STATUS=reloading")
    assert systemd.recv() == {"RELOADING": "1", "STATUS": "reloading"}


# -- disabled -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)},  # watchdog without socket
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/path"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
    ],
)
def test_noop_without_usable_notify_socket(environ: dict[str, str]) -> None:
    notifier = SystemdNotifier.from_environ(environ, pid=PID)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.status("x", now=1.0)
    notifier.tick(now=2.0)
    notifier.watchdog_ping()
    notifier.stopping("x")
    notifier.extend_timeout(1.0)
    assert notifier.notify("READY=1") is False
    notifier.close()


def test_from_environ_defaults_to_os_environ(
    monkeypatch: pytest.MonkeyPatch, systemd: FakeSystemd
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier.from_environ()
    assert notifier.enabled
    assert notifier.watchdog_interval == 2.0
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not SystemdNotifier.from_environ().enabled


# -- failures never raise -----------------------------------------------------------------


def test_send_failure_after_receiver_closed_does_not_raise(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = notifier_for(systemd, WATCHDOG_USEC="2000000")
    notifier.ready()
    systemd.recv()
    systemd.close()  # socket closed and its path removed: ENOENT from now on
    with caplog.at_level(logging.DEBUG, logger="effectd.daemon.sdnotify"):
        notifier.ready("again")
        notifier.status("x", now=10.0)
        notifier.tick(now=10.0)
        notifier.stopping("bye")
        notifier.extend_timeout(5)
        assert notifier.notify("READY=1") is False
    assert any("failed" in r.getMessage() for r in caplog.records)


def test_send_failure_abstract_receiver_gone(abstract_systemd: FakeSystemd) -> None:
    notifier = notifier_for(abstract_systemd)
    abstract_systemd.close()  # ECONNREFUSED
    notifier.ready("x")
    notifier.stopping()


def test_failed_sends_are_retried_by_tick(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd, WATCHDOG_USEC="10000000")
    systemd.close()
    notifier.status("pending", now=0.0)  # fails: held for a retry
    notifier.tick(now=0.0)  # the ping fails too
    assert notifier.seconds_until_due(now=0.0) == RETRY_INTERVAL  # no busy loop meanwhile
    # systemd comes back at the same address (as after `systemctl daemon-reexec`).
    revived = FakeSystemd(systemd.address, systemd.env_value)
    try:
        notifier.tick(now=0.5)
        revived.assert_silent()  # not retried before RETRY_INTERVAL
        notifier.tick(now=RETRY_INTERVAL)
        assert revived.recv() == {"WATCHDOG": "1"}
        assert revived.recv() == {"STATUS": "pending"}
        # Back to the normal cadence: next ping one watchdog interval after the success.
        assert notifier.seconds_until_due(now=RETRY_INTERVAL) == 5.0
    finally:
        revived.close()


def test_seconds_until_due_bounds_the_loop_timeout(systemd: FakeSystemd) -> None:
    assert notifier_for(systemd).seconds_until_due(now=0.0) is None  # nothing to do, ever
    notifier = notifier_for(systemd, WATCHDOG_USEC="30000000")
    assert notifier.seconds_until_due(now=100.0) == 0.0  # first ping is due at once
    notifier.tick(now=100.0)
    systemd.recv()
    assert notifier.seconds_until_due(now=104.0) == 11.0
    notifier.status("a", now=104.0)
    systemd.recv()
    notifier.status("b", now=104.25)  # held until 105.0
    assert notifier.seconds_until_due(now=104.5) == 0.5
    notifier.tick(now=105.0)
    assert systemd.recv() == {"STATUS": "b"}
    assert notifier.seconds_until_due(now=105.0) == 10.0
    assert notifier.seconds_until_due(now=200.0) == 0.0  # overdue: never negative


def test_own_socket_closed_under_us_does_not_raise(systemd: FakeSystemd) -> None:
    notifier = notifier_for(systemd)
    notifier.ready()
    systemd.recv()
    sock = notifier._sock  # the notifier's own socket, broken behind its back
    assert sock is not None
    sock.close()
    notifier.stopping()  # EBADF: logged, socket dropped
    notifier.stopping("retry")  # a fresh socket
    assert systemd.recv() == {"STOPPING": "1", "STATUS": "retry"}
    notifier.close()
    notifier.close()


# -- children -----------------------------------------------------------------------------


def test_child_environ_strips_notify_variables() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "PATH": "/usr/bin",
        "EFFECTD_RUNTIME_DIR": "/run/user/1000/effectd",
    }
    child = SystemdNotifier.child_environ(env)
    assert child == {"PATH": "/usr/bin", "EFFECTD_RUNTIME_DIR": "/run/user/1000/effectd"}
    assert "NOTIFY_SOCKET" in env  # the input is not modified
    child["X"] = "1"
    assert "X" not in env


def test_child_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("EFFECTD_TEST_MARK", "1")
    child = SystemdNotifier.child_environ()
    assert "NOTIFY_SOCKET" not in child
    assert child["EFFECTD_TEST_MARK"] == "1"


def test_scrub_environ_in_place() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_PID": "1", "HOME": "/root"}
    SystemdNotifier.scrub_environ(env)
    assert env == {"HOME": "/root"}
