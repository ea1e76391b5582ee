"""Where a daemon lives: runtime dir (sockets, lock), state dir (journal, outputs), endpoints.

Every command and the client resolve directories the same way, so ``EFFECTD_RUNTIME_DIR`` and
``EFFECTD_STATE_DIR`` isolate daemons from each other (tests run many side by side).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from effectd.ipc.errors import BadRequest

RUNTIME_ENV = "EFFECTD_RUNTIME_DIR"
STATE_ENV = "EFFECTD_STATE_DIR"

LOCK_FILE = "effectd.lock"
"""Held with flock by the running daemon; contains its pid. Taken before binding any socket,
because a second ipc bind silently steals the endpoint from the first daemon."""

STATE_LOCK_FILE = "daemon.json"
"""In the state dir: held with flock by the daemon that owns the journal, for its whole life, and
holding ``{pid, runtime_dir, instance, started}`` so that a client whose runtime dir is empty
finds the live daemon instead of starting a second one on the same journal."""

LOG_FILE = "effectd.log"
"""Log of a daemon started on demand (in the state dir)."""

DEFAULT_STREAM_HWM = 256
"""Messages queued per link on the stream path (worker PUB, daemon XSUB/XPUB, client SUB) before
the publisher drops. Chunks are at most 64 KiB, so one stopped subscriber costs at most ~16 MiB
per link; it then catches up from the output files. ``EFFECTD_STREAM_HWM`` overrides it (tests
set it tiny to force drops)."""


def stream_hwm(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("EFFECTD_STREAM_HWM", DEFAULT_STREAM_HWM)))
    except ValueError:
        return DEFAULT_STREAM_HWM


MAX_SUBSCRIPTION_BYTES = 4096
"""The daemon's stream socket drops a subscriber that sends a longer message (the MAXMSGSIZE of
the XPUB in daemon/server.py ``bind``, which must stay equal to this)."""
MAX_SUBSCRIPTION_TOPIC_BYTES = MAX_SUBSCRIPTION_BYTES - len(b"\x09SUBSCRIBE")
"""The longest topic that fits: ZMTP 3.1 sends a subscription as a SUBSCRIBE command (10 bytes
of name before the topic). A longer one gets the SUB socket disconnected, and it re-sends the
same subscription on every reconnect, so that socket never receives anything again."""


def check_topic(topic: bytes) -> bytes:
    """Refuse a subscription the daemon would answer by disconnecting the SUB socket for good."""
    if len(topic) > MAX_SUBSCRIPTION_TOPIC_BYTES:
        raise BadRequest(f"subscription topic is {len(topic)} bytes, longer than {MAX_SUBSCRIPTION_TOPIC_BYTES} "
                         "bytes: the daemon would disconnect the SUB socket for good")
    return topic


# Linux sockaddr_un.sun_path is 108 bytes including the NUL.
MAX_IPC_PATH = 107


def runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$EFFECTD_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/effectd``, else ``$TMPDIR/effectd-<uid>``
    (``/tmp`` without ``TMPDIR``). The last one lives in a world-writable dir: see
    :func:`effectd.ipc.dirs.check_private_dir` for why that is safe."""
    env = os.environ if environ is None else environ
    if env.get(RUNTIME_ENV):
        return Path(env[RUNTIME_ENV])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "effectd"
    return Path(env.get("TMPDIR") or "/tmp") / f"effectd-{os.getuid()}"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$EFFECTD_STATE_DIR``, else ``$XDG_STATE_HOME/effectd``, else ``~/.local/state/effectd``."""
    env = os.environ if environ is None else environ
    if env.get(STATE_ENV):
        return Path(env[STATE_ENV])
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "effectd"
    return Path(env.get("HOME", str(Path.home()))) / ".local" / "state" / "effectd"


@dataclass(frozen=True)
class Endpoints:
    """The four ZeroMQ endpoints of one daemon, all ``ipc://`` files in its runtime dir.

    * ``control`` - ROUTER bound by the daemon; clients connect REQ (or DEALER).
    * ``stream``  - XPUB bound by the daemon; clients connect SUB, topic = effect id.
    * ``workers`` - ROUTER bound by the daemon; workers connect DEALER.
    * ``publish`` - XSUB bound by the daemon; workers connect PUB and publish output chunks.
    """

    runtime: Path
    control: str
    stream: str
    workers: str
    publish: str

    @classmethod
    def for_runtime(cls, runtime: Path) -> Endpoints:
        def ipc(name: str) -> str:
            path = str(runtime / name)
            if len(path.encode()) > MAX_IPC_PATH:
                raise ValueError(
                    f"runtime dir {runtime} is too long for an ipc socket path "
                    f"({len(path.encode())} > {MAX_IPC_PATH} bytes); set {RUNTIME_ENV} to a shorter path"
                )
            return f"ipc://{path}"

        return cls(
            runtime=runtime,
            control=ipc("control.sock"),
            stream=ipc("stream.sock"),
            workers=ipc("workers.sock"),
            publish=ipc("publish.sock"),
        )
