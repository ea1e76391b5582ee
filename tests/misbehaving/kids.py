"""Purpose-built misbehaving effect processes for tests/test_proctree.py.

Usage: python kids.py MODE EVENTS_FILE [ARGS...]

Every process appends "start <pid>" to EVENTS_FILE once it is running (and
"term <pid>" / "<signame> <pid>" when it receives a signal it handles), so the
tests can wait for grandchildren with a bounded poll instead of sleeping.
The sleeps below are part of the *misbehaviour* (pacing a fork loop), never
test synchronisation.
"""

from __future__ import annotations

import os
import signal
import sys
import time

EVENTS = sys.argv[2] if len(sys.argv) > 2 else os.devnull


def log(what: str) -> None:
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def forever() -> None:
    while True:
        signal.pause()


def log_term_and_continue(signum: int, _frame: object) -> None:
    log("term" if signum == signal.SIGTERM else signal.Signals(signum).name.lower())


def ignore_term() -> None:
    """Receives SIGTERM (logs it) and keeps running."""
    signal.signal(signal.SIGTERM, log_term_and_continue)
    log("start")
    forever()


def forker(n: int, kids_ignore_term: bool) -> None:
    """Forks n grandchildren that stay in the tree; the root itself obeys SIGTERM."""
    log("start")
    for _ in range(n):
        if os.fork() == 0:
            if kids_ignore_term:
                signal.signal(signal.SIGTERM, log_term_and_continue)
            log("start")
            forever()
    forever()


def double_fork(root_stays: bool) -> None:
    """Classic daemonisation: fork, setsid, fork; the intermediate exits."""
    log("start")
    a = os.fork()
    if a == 0:
        os.setsid()
        if os.fork() == 0:
            os.chdir("/")
            signal.signal(signal.SIGTERM, log_term_and_continue)  # stubborn daemon
            log("start")
            forever()
        os._exit(0)
    os.waitpid(a, 0)
    if root_stays:
        forever()
    os._exit(0)


def orphan_exit() -> None:
    """Root forks A, A forks B and exits; B waits to be reparented, then exits.

    The root never waits for A, so B ends up as a zombie of A's nearest
    subreaper (the worker) while the root keeps running.
    """
    log("start")
    a = os.fork()
    if a == 0:
        a_pid = os.getpid()
        if os.fork() == 0:
            while os.getppid() == a_pid:
                time.sleep(0.002)
            log("orphan")
            os._exit(0)
        os._exit(0)
    forever()


def fork_loop(limit: int) -> None:
    """Ignores SIGTERM and keeps forking (children setsid and fork too) until killed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log("start")
    for _ in range(limit):
        if os.fork() == 0:
            os.setsid()
            log("start")
            if os.fork() == 0:
                log("start")
            forever()
        time.sleep(0.003)
    forever()


def victim() -> None:
    """Logs every catchable signal it gets; has a child in its process group."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCONT, signal.SIGUSR1):
        signal.signal(sig, log_term_and_continue)
    log("start")
    if os.fork() == 0:
        log("start")
    forever()


def main() -> None:
    mode = sys.argv[1]
    args = sys.argv[3:]
    if mode == "ignore_term":
        ignore_term()
    elif mode == "forker":
        forker(int(args[0]), kids_ignore_term=len(args) > 1 and args[1] == "stubborn")
    elif mode == "double_fork":
        double_fork(root_stays=bool(args) and args[0] == "stay")
    elif mode == "orphan_exit":
        orphan_exit()
    elif mode == "fork_loop":
        fork_loop(int(args[0]) if args else 300)
    elif mode == "victim":
        victim()
    elif mode == "exit":
        sys.exit(int(args[0]) if args else 0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
