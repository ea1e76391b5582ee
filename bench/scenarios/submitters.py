"""9. concurrent submitters 1/8/32 (threads, each with its own ``Client``) submitting
``submit_sleep(0)`` for a fixed time: submits/s and fsyncs per submit.

fsyncs are counted, not estimated, in a second pass with the same windows: the daemon runs under
``strace -f --seccomp-bpf -e trace=fsync,fdatasync -ff`` (only those calls stop it) and the sync
calls of the daemon process itself are counted before and after each window (workers' files
excluded). They include every journal commit of the window, also those for the sleep effects
starting and finishing. strace slows the daemon somewhat, so submits/s come from the first,
untraced pass only. Without strace the scenario reports submits/s only and says so.

Baseline, same run: SQLite WAL, synchronous=FULL, one row per transaction and 100 per transaction."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper


def window(d: BenchDaemon, threads: int, seconds: float, count_syncs: bool) -> dict[str, Any]:
    clients = [d.client() for _ in range(threads)]
    for c in clients:
        c.submit_sleep(0)  # connect and warm
    time.sleep(0.3)  # let the warm-up effects finish
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()
    errors: list[str] = []

    def loop(i: int) -> None:
        c = clients[i]
        start.wait()
        n = 0
        try:
            while not stop.is_set():
                c.submit_sleep(0)
                n += 1
        except Exception as exc:
            errors.append(repr(exc))
        counts[i] = n

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    syncs0 = d.sync_calls() if count_syncs else 0
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join(60)
    elapsed = time.perf_counter() - t0
    syncs = d.sync_calls() - syncs0 if count_syncs else None
    total = sum(counts)
    for c in clients:
        c.close()
        d.clients.remove(c)
    return {"threads": threads, "submits": total, "seconds": elapsed, "rate": total / elapsed,
            "syncs": syncs, "submits_per_sync": (total / syncs) if syncs else None, "errors": errors[:5]}


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("submitters", "concurrent submitters (threads, own Client each)")
    use_strace = shutil.which("strace") is not None
    windows = []
    with BenchDaemon() as d:
        for n in sizes.concurrency:
            windows.append(window(d, n, sizes.submitter_seconds, False))
            time.sleep(0.5)  # the queue of sleep(0) effects drains between windows
    if use_strace:
        with BenchDaemon(strace_syncs=True) as d:
            for w in windows:
                traced = window(d, w["threads"], sizes.submitter_seconds, True)
                w["syncs"] = traced["syncs"]
                w["traced_submits"] = traced["submits"]
                w["traced_rate"] = traced["rate"]
                w["submits_per_sync"] = traced["submits_per_sync"]
                time.sleep(0.5)
    one = run_helper("bench.baselines:sqlite_wal", sizes.sqlite_rows, 1)
    hundred = run_helper("bench.baselines:sqlite_wal", sizes.sqlite_rows * 10, 100)
    res.details = {"windows": windows, "sqlite_1_per_txn": one, "sqlite_100_per_txn": hundred,
                   "fsync_counting": "strace --seccomp-bpf on the daemon" if use_strace
                   else "strace not installed: submits/s only"}
    single = windows[0]["rate"]
    for w in windows:
        n = w["threads"]
        row = Row(f"{n} submitter(s): submits/s", w["rate"], "subm/s", one["rows_per_s"],
                  "SQLite WAL FULL 1 row/txn rows/s")
        if n == max(sizes.concurrency) and n > 1:
            row.target = ">= 5x single submitter"
            row.met = w["rate"] >= 5 * single
        res.rows.append(row)
        if w["submits_per_sync"] is not None:
            row2 = Row(f"{n} submitter(s): submits per fsync", w["submits_per_sync"], "subm/sync")
            if n == max(sizes.concurrency) and n > 1:
                row2.target = ">= 5"
                row2.met = w["submits_per_sync"] >= 5
            res.rows.append(row2)
        if w["errors"]:
            res.error = f"{n} submitters: {w['errors']}"
    res.rows.append(Row(f"{max(sizes.concurrency)} vs 1 submitter rate", windows[-1]["rate"] / single, "x"))
    res.rows.append(Row("  baseline: SQLite WAL FULL 100 rows/txn", hundred["rows_per_s"], "rows/s"))
    return res
