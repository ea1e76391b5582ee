"""``effectd``: run the daemon in the foreground (as systemd expects).

``effectctl daemon start`` and the client's autostart run this same command detached.
Exit codes: 0 clean stop, 1 could not start (the message says why), 2 usage,
74 (EX_IOERR) the journal was deleted or replaced while running (systemd restarts it),
75 (EX_TEMPFAIL) another daemon already runs for this runtime dir or on this state dir (journal).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from effectd import __version__
from effectd.ipc.constants import EXIT_ALREADY_RUNNING
from effectd.ipc.endpoints import runtime_dir, state_dir


def build_parser() -> argparse.ArgumentParser:
    from effectd.daemon.config import DaemonConfig

    d = DaemonConfig(Path("."), Path("."))
    p = argparse.ArgumentParser(prog="effectd", description="effectd daemon: runs effects in the background.")
    p.add_argument("--version", action="version", version=f"effectd {__version__}")
    p.add_argument("--runtime-dir", type=Path, help="sockets and lock (default: $EFFECTD_RUNTIME_DIR, "
                   "$XDG_RUNTIME_DIR/effectd or /tmp/effectd-UID)")
    p.add_argument("--state-dir", type=Path, help="journal and outputs (default: $EFFECTD_STATE_DIR, "
                   "$XDG_STATE_HOME/effectd or ~/.local/state/effectd)")
    p.add_argument("--parallel", type=int, default=d.parallel, help=f"effects running at once (default {d.parallel})")
    p.add_argument("--min-workers", type=int, default=d.min_workers,
                   help=f"workers kept warm (default {d.min_workers})")
    p.add_argument("--max-workers", type=int, default=d.max_workers,
                   help=f"worker processes at most (default {d.max_workers})")
    p.add_argument("--worker-slots", type=int, default=d.worker_slots,
                   help=f"shell/sleep effects per worker (default {d.worker_slots})")
    p.add_argument("--worker-idle-timeout", type=float, default=d.worker_idle_timeout)
    p.add_argument("--max-effects-per-worker", type=int, default=d.max_effects_per_worker)
    p.add_argument("--max-worker-rss", type=int, default=d.max_worker_rss, help="bytes; 0 = no limit")
    p.add_argument("--max-queued", type=int, default=d.max_queued)
    p.add_argument("--max-waits", type=int, default=d.max_waits)
    p.add_argument("--max-output-bytes", type=int, default=d.max_output_bytes,
                   help=f"default cap per output stream of an effect (default {d.max_output_bytes})")
    p.add_argument("--kill-grace", type=float, default=d.kill_grace, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--adopt-grace", type=float, default=d.adopt_grace)
    p.add_argument("--orphan-timeout", type=float, default=d.orphan_timeout)
    p.add_argument("--heartbeat", type=float, default=d.heartbeat)
    p.add_argument("--retain-days", type=float, default=d.retain_days,
                   help=f"keep final effects this many days (default {d.retain_days:g})")
    p.add_argument("--retain-count", type=int, default=d.retain_count,
                   help=f"keep at most this many final effects (default {d.retain_count})")
    p.add_argument("--retain-bytes", type=int, default=d.retain_bytes,
                   help=f"keep at most this many output bytes of final effects (default {d.retain_bytes})")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR; or $EFFECTD_LOG_LEVEL")
    p.add_argument("--log-file", type=Path, default=None, help="log to this size-capped file instead of stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from effectd.daemon.config import DaemonConfig
    from effectd.daemon.lock import AlreadyRunning, RuntimeLock, StateLock
    from effectd.daemon.logs import configure_logging
    from effectd.daemon.sdnotify import SystemdNotifier
    from effectd.daemon.server import Daemon
    from effectd.ipc.dirs import RUNTIME_DIR, STATE_DIR, ensure_private_dir
    from effectd.ipc.errors import UnsafeDirectory
    from effectd.journal import JournalCorrupt

    configure_logging(args.log_level, args.log_file)
    log = logging.getLogger("effectd")
    faulthandler.enable()
    config = DaemonConfig(
        runtime_dir=(args.runtime_dir or runtime_dir()).absolute(),
        state_dir=(args.state_dir or state_dir()).absolute(),
        parallel=args.parallel, min_workers=args.min_workers, max_workers=args.max_workers,
        worker_slots=args.worker_slots, worker_idle_timeout=args.worker_idle_timeout,
        max_effects_per_worker=args.max_effects_per_worker, max_worker_rss=args.max_worker_rss,
        max_queued=args.max_queued, max_waits=args.max_waits, max_output_bytes=args.max_output_bytes,
        kill_grace=args.kill_grace, drain_timeout=args.drain_timeout, adopt_grace=args.adopt_grace,
        orphan_timeout=args.orphan_timeout, heartbeat=args.heartbeat,
        retain_days=args.retain_days, retain_count=args.retain_count, retain_bytes=args.retain_bytes,
        log_level=args.log_level or os.environ.get("EFFECTD_LOG_LEVEL", "INFO"), log_file=args.log_file,
    )
    if config.parallel < 1 or config.max_workers < 1 or config.min_workers < 0:
        print("effectd: --parallel and --max-workers must be >= 1, --min-workers >= 0", file=sys.stderr)
        return 2
    os.environ["EFFECTD_RUNTIME_DIR"] = str(config.runtime_dir)
    os.environ["EFFECTD_STATE_DIR"] = str(config.state_dir)
    try:
        ensure_private_dir(config.runtime_dir, RUNTIME_DIR)
        ensure_private_dir(config.state_dir, STATE_DIR)
    except UnsafeDirectory as exc:
        print(f"effectd: {exc.message}", file=sys.stderr)
        return 1
    daemon = Daemon(config)
    # The journal's lock first: a daemon on another runtime dir must not get to open it.
    state_lock = StateLock(config.state_dir)
    lock = RuntimeLock(config.runtime_dir)
    try:
        state_lock.acquire_for(config.runtime_dir, daemon.instance)
        lock.acquire_for_us()
    except AlreadyRunning as exc:
        print(f"effectd: {exc}", file=sys.stderr)
        state_lock.release()
        return EXIT_ALREADY_RUNNING
    daemon.runtime_lock, daemon.state_lock = lock, state_lock
    SystemdNotifier.scrub_environ(os.environ)
    try:
        daemon.open_state()
    except JournalCorrupt as exc:
        print(f"effectd: the journal {config.journal_path} cannot be used: {exc}\n"
              f"effectd: nothing was changed. Move it aside (e.g. `mv {config.journal_path} "
              f"{config.journal_path}.broken`) to start with an empty journal, or restore a backup.",
              file=sys.stderr)
        lock.release()
        state_lock.release()
        return 1
    daemon.recover()
    daemon.bind()

    def on_signal(signum: int, frame: Any) -> None:
        # First SIGTERM/SIGINT drains; a second one stops at once.
        daemon.begin_shutdown(drain=not daemon.draining)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("effectd %s started (pid %d, runtime %s, state %s)", __version__, os.getpid(),
             config.runtime_dir, config.state_dir)
    try:
        daemon.run_loop()
    finally:
        daemon.close()
        lock.release()
        state_lock.release()
    if daemon.journal_lost is not None:
        # Leave without the interpreter's teardown: it would close the SQLite connection, which
        # deletes the -wal/-shm files by name (possibly those of a restored journal).
        logging.shutdown()
        os._exit(daemon.exit_code)
    log.info("effectd stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
