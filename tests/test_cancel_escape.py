"""Cancel and timeout end an effect promptly, even when a process escaped its tree (issue 14.6).

A process that leaves the effect's session *and* drops the marker variable (``setsid env -i``)
and whose parent exits cannot be found by the tree kill (docs/architecture.md §5.5), but if it
still holds the effect's output pipes it is found as their holder: it is killed when it runs as
our uid, and reported in the record's ``leaked_processes`` when it cannot be killed. Either way
the effect reaches its final state within kill-grace + 1 s, and the kill grace is honoured.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from effectd.client import Client, EffectState, shell_spec
from tests.conftest import DaemonHandle, wait_until

GRACE = 0.5


@pytest.fixture
def d(daemon_factory: Any) -> DaemonHandle:
    return daemon_factory("--kill-grace", str(GRACE))  # type: ignore[no-any-return]


def _token() -> str:
    """A unique duration for ``sleep``, so the test can find (and always stop) its escapee."""
    return f"119.{random.randrange(10**8):08d}"


def _escapees(token: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info.get("cmdline") == ["sleep", token]:
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
    return out


@contextlib.contextmanager
def _stopped_afterwards(token: str) -> Iterator[None]:
    try:
        yield
    finally:
        for p in _escapees(token):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _escape_command(token: str, as_user: str = "") -> str:
    return f"(setsid env -i {as_user} sh -c 'exec sleep {token}' &); sleep 120"


def _end(c: Client, eid: str, how: str) -> float:
    """Cancel (or let time out) a running effect; return the seconds until it was final."""
    t0 = time.monotonic()
    if how == "cancel":
        c.cancel(eid)
    rec = c.wait(eid, timeout=GRACE + 3)
    assert rec.final, f"still {rec.state.value} {time.monotonic() - t0:.1f}s after {how}"

    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_escaped_pipe_holder_is_killed_and_effect_ends_within_grace(d: DaemonHandle, how: str) -> None:
    c = d.client()
    token = _token()
    with _stopped_afterwards(token):
        timeout = 1.5 if how == "timeout" else None
        eid = c.submit(shell_spec(_escape_command(token), timeout=timeout))
        (escapee,) = wait_until(lambda: _escapees(token), what="the escaped process")
        assert "EFFECTD_EFFECT_ID" not in escapee.environ()  # really outside the marker scan
        if how == "timeout":
            wait_until(lambda: c.status(eid).final, timeout=timeout + GRACE + 3, what="the timeout to end it")
            rec = c.status(eid)
            assert rec.finished_at is not None and rec.started_at is not None
            assert rec.finished_at - rec.started_at <= timeout + GRACE + 1.0 + 0.3, rec
        else:
            elapsed = _end(c, eid, how)
            assert elapsed <= GRACE + 1.0, f"final {elapsed:.2f}s after cancel"
            rec = c.status(eid)
        expected = EffectState.CANCELLED if how == "cancel" else EffectState.TIMED_OUT
        assert rec.state is expected, (rec.state, rec.reason)
        assert rec.leaked_processes == 0, rec
        wait_until(lambda: not _escapees(token), timeout=2, what="the escapee to be killed")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the escapee as another user")
def test_unkillable_pipe_holder_is_reported_as_leaked(d: DaemonHandle) -> None:
    c = d.client()
    token = _token()
    with _stopped_afterwards(token):
        as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups"
        eid = c.submit(shell_spec(_escape_command(token, as_nobody)))
        wait_until(lambda: _escapees(token), what="the escaped process")
        elapsed = _end(c, eid, "cancel")
        assert elapsed <= GRACE + 1.0, f"final {elapsed:.2f}s after cancel"
        rec = c.status(eid)
        assert (rec.state, rec.reason, rec.leaked_processes) == (EffectState.CANCELLED, "cancelled", 1), rec
        assert _escapees(token), "another user's process is not ours to kill"


@pytest.mark.slow
def test_cancel_honours_the_kill_grace(daemon_factory: Any) -> None:
    """SIGTERM first, SIGKILL only after --kill-grace: a program that needs 0.5 s to wind down
    gets it (the worker used to compare wall-clock time with the monotonic kill deadline)."""
    d = daemon_factory("--kill-grace", "3")
    c = d.client()
    eid = c.submit(shell_spec("trap 'sleep 0.5; echo graceful; exit 0' TERM; echo up; "
                              "while :; do sleep 0.05; done"))
    wait_until(lambda: b"up" in c.output(eid), what="the effect to start")
    c.cancel(eid)
    rec = c.wait(eid, timeout=10)
    assert rec.state is EffectState.CANCELLED
    assert c.output(eid) == b"up\ngraceful\n"
