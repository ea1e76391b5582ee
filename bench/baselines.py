"""Raw building blocks effectd is compared with, each run in a fresh interpreter by
``common.run_helper`` (so forks and sockets never mix with the driver's).

Every function returns plain JSON data. Latencies are in milliseconds unless named otherwise.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from typing import Any

from bench.common import summary


def _noop() -> None:
    return None


# ---- REQ/REP round trip between two processes over ipc -----------------------------------------

def _rep_server(addr: str, ready: Any) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(addr)
    ready.set()
    while True:
        msg = msgpack.unpackb(sock.recv(), raw=False)
        if msg.get("op") == "quit":
            sock.send(msgpack.packb({"ok": True}))
            break
        sock.send(msgpack.packb({"ok": True, "id": msg.get("id"), "echo": msg.get("payload")},
                                use_bin_type=True))
    sock.close(linger=500)
    ctx.term()


def reqrep(n: int) -> dict[str, Any]:
    """REQ/REP round trips over ipc to a REP server in another process, with a ~200 B msgpack
    request that the server unpacks and answers (what a submit costs without the journal)."""
    tmp = tempfile.mkdtemp(prefix="ebq-", dir="/tmp")
    addr = f"ipc://{tmp}/rr.sock"
    mp = multiprocessing.get_context("fork")  # forked before this process creates any zmq context
    ready = mp.Event()
    server = mp.Process(target=_rep_server, args=(addr, ready), daemon=True)
    server.start()
    ready.wait(10)
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.connect(addr)
    payload = {"op": "submit", "id": 0, "payload": {"kind": "sleep", "seconds": 0, "x": "y" * 140}}
    lat = []
    for i in range(n + 200):
        payload["id"] = i
        t0 = time.perf_counter()
        sock.send(msgpack.packb(payload, use_bin_type=True))
        msgpack.unpackb(sock.recv(), raw=False)
        if i >= 200:
            lat.append((time.perf_counter() - t0) * 1000)
    sock.send(msgpack.packb({"op": "quit"}))
    sock.recv()
    sock.close(linger=0)
    ctx.term()
    server.join(5)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"request_bytes": len(msgpack.packb(payload, use_bin_type=True)), **summary(lat)}


# ---- fsync of a small file ---------------------------------------------------------------------

def fsync_small(n: int, directory: str = "/tmp") -> dict[str, Any]:
    """Append ~100 B to a file and ``os.fsync`` it, ``n`` times (same filesystem as the journal)."""
    fd, path = tempfile.mkstemp(prefix="ebf-", dir=directory)
    lat = []
    try:
        for i in range(n + 20):
            os.write(fd, b"x" * 100)
            t0 = time.perf_counter()
            os.fsync(fd)
            if i >= 20:
                lat.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return summary(lat)


# ---- ProcessPoolExecutor -----------------------------------------------------------------------

def ppe_latency(n: int, workers: int = 2) -> dict[str, Any]:
    """``ProcessPoolExecutor(workers).submit(noop).result()``, warm, sequential."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as ex:
        for f in [ex.submit(_noop) for _ in range(workers * 20)]:
            f.result()
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            ex.submit(_noop).result()
            lat.append((time.perf_counter() - t0) * 1000)
    return summary(lat)


def ppe_throughput(n: int, workers: int = 2) -> dict[str, Any]:
    """``n`` no-op tasks submitted at once to a warm ``ProcessPoolExecutor(workers)``; tasks/s."""
    from concurrent.futures import ProcessPoolExecutor, wait

    with ProcessPoolExecutor(workers) as ex:
        for f in [ex.submit(_noop) for _ in range(workers * 20)]:
            f.result()
        t0 = time.perf_counter()
        futures = [ex.submit(_noop) for _ in range(n)]
        wait(futures)
        elapsed = time.perf_counter() - t0
    return {"n": n, "seconds": elapsed, "rate": n / elapsed}


# ---- raw subprocess pool of sleeps -------------------------------------------------------------

def popen_sleeps(n: int, parallel: int, seconds: float) -> dict[str, Any]:
    """``n`` x ``sleep SECONDS`` processes, at most ``parallel`` at once, plain Popen; wall time."""
    t0 = time.perf_counter()
    running: dict[int, subprocess.Popen[bytes]] = {}
    started = 0
    while started < n or running:
        while started < n and len(running) < parallel:
            p = subprocess.Popen(["sleep", str(seconds)])
            running[p.pid] = p
            started += 1
        pid, status = os.wait()
        done = running.pop(pid, None)
        if done is not None:
            done.returncode = os.waitstatus_to_exitcode(status)
    return {"n": n, "parallel": parallel, "seconds": time.perf_counter() - t0}


# ---- pipe read ---------------------------------------------------------------------------------

def pipe_read(size: int, runs: int = 3) -> dict[str, Any]:
    """Read ``head -c SIZE /dev/zero`` from its pipe with ``os.read(fd, 64 KiB)``; MB/s per run."""
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        assert p.stdout is not None
        fd = p.stdout.fileno()
        total = 0
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            total += len(data)
        p.wait()
        elapsed = time.perf_counter() - t0
        assert total == size, (total, size)
        rates.append(size / elapsed / 1e6)
    rates.sort()
    return {"runs": rates, "rate": rates[len(rates) // 2]}


# ---- PUB/SUB latency over ipc ------------------------------------------------------------------

def _timestamp_publisher(addr: str, count: int, interval: float) -> None:
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.connect(addr)
    pub.recv()  # the subscription: from now on nothing is lost to the slow-joiner race
    for _ in range(count):
        pub.send(repr(time.time()).encode() + b"\n")
        time.sleep(interval)
    pub.close(linger=1000)
    ctx.term()


def pubsub_latency(count: int, interval: float = 0.02) -> dict[str, Any]:
    """One-way latency of a PUB/SUB message over ipc between two processes: the publisher sends
    ``time.time()`` every ``interval`` s, the subscriber takes receive time - embedded time (the
    same method as effectd's line-latency scenario)."""
    tmp = tempfile.mkdtemp(prefix="ebp-", dir="/tmp")
    addr = f"ipc://{tmp}/ps.sock"
    import zmq

    mp = multiprocessing.get_context("spawn")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.bind(addr)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pub = mp.Process(target=_timestamp_publisher, args=(addr, count, interval), daemon=True)
    pub.start()
    lat = []
    while len(lat) < count:
        if not sub.poll(10_000):
            break
        msg = sub.recv()
        lat.append((time.time() - float(msg)) * 1000)
    pub.join(10)
    sub.close(linger=0)
    ctx.term()
    shutil.rmtree(tmp, ignore_errors=True)
    return summary(lat)


# ---- SQLite WAL, synchronous=FULL --------------------------------------------------------------

def sqlite_wal(rows: int, per_txn: int, directory: str = "/tmp") -> dict[str, Any]:
    """Insert ``rows`` rows of ~280 B into a fresh WAL database with synchronous=FULL,
    ``per_txn`` rows per BEGIN/COMMIT; rows/s and commits/s."""
    tmp = tempfile.mkdtemp(prefix="ebs-", dir=directory)
    con = sqlite3.connect(os.path.join(tmp, "t.db"), isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b REAL, c BLOB)")
    blob = os.urandom(240)
    t0 = time.perf_counter()
    i = 0
    commits = 0
    while i < rows:
        con.execute("BEGIN")
        for _ in range(min(per_txn, rows - i)):
            con.execute("INSERT INTO t (a, b, c) VALUES (?, ?, ?)", (f"effect-{i:020d}", time.time(), blob))
            i += 1
        con.execute("COMMIT")
        commits += 1
    elapsed = time.perf_counter() - t0
    con.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "per_txn": per_txn, "seconds": elapsed, "rows_per_s": rows / elapsed,
            "commits_per_s": commits / elapsed}
