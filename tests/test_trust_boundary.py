"""Another local user must not get commands run as us.

The runtime dir is trusted only if it is ours, mode 0700 and not a symlink (checked with lstat by
the daemon, the workers and the clients); and a worker runs only assignments MAC'd with its
daemon's secret, so whoever binds a fake ``workers.sock`` cannot make it execute anything.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from effectd.client import Client, DaemonUnavailable
from effectd.daemon.ids import UlidGenerator
from effectd.ipc import codec
from effectd.ipc.endpoints import runtime_dir
from effectd.ipc.schema import check_effect_spec
from tests.conftest import REPO, TESTS_DIR, DaemonHandle, wait_until


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A second local user (the attacker), removed afterwards. Needs root (CI runs as root)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a second user needs root and useradd")
    name = f"edatk{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=30)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


@pytest.fixture
def sticky_tmp() -> Iterator[Path]:
    """Our own world-writable sticky dir, standing in for /tmp (so no test touches the real one)."""
    path = Path(tempfile.mkdtemp(prefix="edt-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: pwd.struct_passwd, *argv: str) -> None:
    subprocess.run(list(argv), user=user.pw_uid, group=user.pw_gid, check=True, capture_output=True,
                   timeout=30)


def shell_assign(marker: Path, outputs: Path) -> dict[str, Any]:
    """An assignment as a daemon sends it, output dir included (a daemon creates it before it
    assigns, and a worker never runs an attempt it cannot claim there)."""
    spec = check_effect_spec({"kind": "shell", "argv": ["touch", str(marker)]})
    effect_id = UlidGenerator().new()
    (outputs / effect_id).mkdir(parents=True)
    return {"t": "assign", "id": effect_id, "attempt": 1, "spec": spec}


def recv_ready(router: zmq.Socket[bytes], timeout: float) -> bytes:
    """Wait for a worker's ``ready`` on a fake daemon's ROUTER; returns the worker's identity."""
    if not router.poll(int(timeout * 1000)):
        raise AssertionError("no worker connected to the fake daemon")
    frames = router.recv_multipart()
    assert codec.unpack(frames[-1])["t"] == "ready"
    return frames[0]


def test_symlinked_runtime_dir_is_refused_and_swapping_it_runs_nothing(
        other_user: pwd.struct_passwd, sticky_tmp: Path, daemon_factory: Any) -> None:
    """The attack: the attacker pre-creates our runtime path as a symlink to a dir of ours (so
    stat-based checks pass), later points it at its own dir with a fake ``workers.sock``; our
    next worker connects there and runs the attacker's ``assign``."""
    d: DaemonHandle = daemon_factory("--kill-grace", "1", start=False)
    ours = d.root / "private"
    ours.mkdir(mode=0o700)
    link = sticky_tmp / f"effectd-{os.getuid()}"
    as_user(other_user, "ln", "-s", str(ours), str(link))
    d.runtime = link
    d.env["EFFECTD_RUNTIME_DIR"] = str(link)
    d.start(wait=False)
    assert d.proc is not None
    marker = d.root / "attacker-was-here"

    def answering() -> bool:
        with contextlib.suppress(Exception), Client(link, state=d.state, autostart=False, timeout=0.5,
                                                    retries=0) as c:
            return bool(c.hello()["workers"])
        return False

    wait_until(lambda: d.proc is not None and (d.proc.poll() is not None or answering()), timeout=20,
               what="the daemon to refuse the runtime dir or to run")
    if d.proc.poll() is None:  # it accepted the symlink: play the rest of the attack
        evil = sticky_tmp / "evil"
        as_user(other_user, "mkdir", "-m", "0755", str(evil))
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
            router.bind(f"ipc://{evil}/workers.sock")  # a process without the daemon's secret
            as_user(other_user, "ln", "-sfn", str(evil), str(link))
            for worker in d.worker_processes():
                worker.kill()  # the daemon starts a new one, which connects through the link
            with contextlib.suppress(AssertionError):
                ident = recv_ready(router, timeout=15)
                router.send_multipart([ident, codec.pack(shell_assign(marker, d.state / "outputs"))])
                wait_until(marker.exists, timeout=5, what="the attacker's command")
            router.setsockopt(zmq.LINGER, 0)
    status = d.proc.poll()
    assert not marker.exists(), "a worker ran the attacker's assignment"
    assert status == 1, f"the daemon accepted a symlinked runtime dir (status {status})"
    assert str(link) in d.log() and "symlink" in d.log(), d.log()
    assert not list(ours.iterdir()), "the daemon created files through the symlink"
    with Client(link, state=d.state, autostart=True) as c, pytest.raises(DaemonUnavailable) as exc:
        c.hello()
    assert str(link) in str(exc.value) and "symlink" in str(exc.value)
    assert not list(ours.iterdir())


def test_fallback_runtime_dir_honours_tmpdir_and_refuses_a_symlink(
        sticky_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("EFFECTD_RUNTIME_DIR", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TMPDIR", str(sticky_tmp))
    expected = sticky_tmp / f"effectd-{os.getuid()}"
    assert runtime_dir() == expected
    target = sticky_tmp / "elsewhere"
    target.mkdir(mode=0o700)
    expected.symlink_to(target)
    state = sticky_tmp / "state"
    with Client(state=state, autostart=True, start_timeout=5) as c, pytest.raises(DaemonUnavailable) as exc:
        c.hello()
    assert "symlink" in str(exc.value) and str(expected) in str(exc.value)
    assert not state.exists() and not list(target.iterdir())  # refused before starting anything


@pytest.mark.slow
def test_worker_runs_only_assignments_macd_with_its_daemons_secret(tmp_path: Path) -> None:
    """A fake daemon (any process without the secret) binds the worker endpoint: a real worker
    connects to it but executes nothing it sends without a valid MAC."""
    runtime = Path(tempfile.mkdtemp(prefix="edw-", dir="/tmp"))  # short: ipc path limit
    runtime.chmod(0o700)
    key = os.urandom(32)
    markers = {name: tmp_path / name for name in ("no-mac", "wrong-mac", "short-mac", "genuine")}
    read_fd, write_fd = os.pipe()
    os.write(write_fd, key)
    os.close(write_fd)
    log = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)])}
    try:
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router, open(log, "wb") as log_file:
            router.setsockopt(zmq.LINGER, 0)
            router.bind(f"ipc://{runtime}/workers.sock")
            worker = subprocess.Popen(
                [sys.executable, "-m", "effectd.daemon.worker", "--runtime-dir", str(runtime),
                 "--outputs", str(tmp_path / "outputs"), "--worker-id", "w-test", "--kill-grace", "1",
                 "--key-fd", str(read_fd)],
                env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(read_fd,))
            os.close(read_fd)
            try:
                ident = recv_ready(router, timeout=15)
                for name, mac in (("no-mac", None), ("wrong-mac", hmac.digest(os.urandom(32), b"x", "sha256")),
                                  ("short-mac", b"\0")):
                    body = codec.pack(shell_assign(markers[name], tmp_path / "outputs"))
                    router.send_multipart([ident, body] if mac is None else [ident, body, mac])
                body = codec.pack(shell_assign(markers["genuine"], tmp_path / "outputs"))
                router.send_multipart([ident, body, hmac.digest(key, body, "sha256")])
                # Messages on one connection are handled in order: once the genuine assignment
                # ran, the forged ones before it have been seen (and must have been dropped).
                wait_until(markers["genuine"].exists, timeout=10, what="the genuine assignment")
                assert [n for n, m in markers.items() if m.exists()] == ["genuine"]
                stop = codec.pack({"t": "stop", "reason": "test"})
                router.send_multipart([ident, stop, hmac.digest(key, stop, "sha256")])
                worker.wait(15)
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait(5)
        text = log.read_text(errors="replace")
        assert text.count("dropped a message without a valid MAC") == 3, text
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.slow
def test_surviving_worker_never_reconnects_through_a_swapped_runtime_dir(daemon_factory: Any) -> None:
    """The daemon crashed (its workers survive and keep reconnecting) and its runtime dir is
    replaced by a symlink to a dir holding a fake ``workers.sock``: the worker's reconnects -
    its own and zmq's automatic ones - never reach the fake socket."""
    d: DaemonHandle = daemon_factory("--heartbeat", "0.2", "--kill-grace", "1")
    [worker] = d.worker_processes()
    d.kill9()
    evil = d.root / "evil"
    evil.mkdir(mode=0o700)  # ours: a stat-based check through the symlink would accept it
    try:
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
            router.setsockopt(zmq.LINGER, 0)
            router.bind(f"ipc://{evil}/workers.sock")
            shutil.rmtree(d.runtime)
            d.runtime.symlink_to(evil)
            # The worker notices the silence (3 heartbeats), tries to reconnect, refuses the dir.
            wait_until(lambda: "runtime dir refused" in d.log(), timeout=15,
                       what="the worker's reconnect attempt")
            assert not router.poll(500), "the worker connected to the fake daemon"
    finally:
        worker.kill()


@pytest.mark.slow
def test_worker_key_is_private_kept_across_restarts_and_not_inherited_by_effects(daemon: DaemonHandle) -> None:
    key_file = daemon.state / "worker.key"
    key = key_file.read_bytes()
    assert len(key) == 32 and (key_file.stat().st_mode & 0o777) == 0o600
    c = daemon.client()
    # The effect lists its environment and its open descriptors.
    eid = c.submit_shell("env; ls -l /proc/self/fd/")
    assert c.wait(eid, timeout=20).state.value == "succeeded"
    seen = c.output(eid)
    assert key not in seen and key.hex().encode() not in seen
    # stdout, stderr and the progress pipe; the worker closed the key's pipe before anything ran.
    assert seen.count(b"-> pipe:") <= 3, seen.decode(errors="replace")
    [old_worker] = daemon.worker_processes()
    daemon.kill9()
    daemon.start()
    assert key_file.read_bytes() == key
    # The restarted daemon re-adopts the old worker, which accepts its (MAC'd) messages.
    c2 = daemon.client()
    wait_until(lambda: old_worker.pid in [w["pid"] for w in c2.hello()["workers"]], timeout=15,
               what="the old worker to be re-adopted")
    eid = c2.submit_shell("true")
    assert c2.wait(eid, timeout=20).state.value == "succeeded"
    assert "without a valid MAC" not in daemon.log()


@pytest.mark.slow
def test_daemon_stops_cleanly_when_its_vanished_runtime_dir_comes_back_as_a_symlink(daemon_factory: Any) -> None:
    d: DaemonHandle = daemon_factory("--kill-grace", "1")
    c = d.client()
    done = c.submit_shell("echo before")
    assert c.wait(done, timeout=20).state.value == "succeeded"
    elsewhere = d.root / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "keep").write_text("untouched")
    for _ in range(20):  # the daemon may re-create the dir between our two steps: try again
        shutil.rmtree(d.runtime, ignore_errors=True)
        with contextlib.suppress(FileExistsError):
            d.runtime.symlink_to(elsewhere)
            break
    assert d.proc is not None
    d.proc.wait(20)  # refused to restore through the symlink: drained and stopped
    assert d.proc.returncode == 0
    assert "cannot restore runtime dir" in d.log() and "symlink" in d.log()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep"]
    with Client(d.runtime, state=d.state, autostart=True) as c2, pytest.raises(DaemonUnavailable) as exc:
        c2.hello()
    assert "symlink" in str(exc.value)
