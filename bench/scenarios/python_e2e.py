"""2. no-op python effect end to end: ``submit_python("bench.fx:noop")`` + ``wait``.

Baseline, same run: ``ProcessPoolExecutor(2).submit(noop).result()`` on a warm pool.

Diagnostics: the critical path is split with the journal's event times (``submitted``/``running``/
``finished``, written by the daemon) and the record's ``started_at``/``finished_at`` (set by the
worker; same clock); fsyncs per effect are counted in a separate short pass with the daemon under
strace (no latency is taken from that pass)."""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import time
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper, summary

TITLE = "no-op python effect, submit + wait"
FLAGS = ("--min-workers", "2", "--max-workers", "2")


def breakdown(d: BenchDaemon, marks: list[tuple[str, float, float, float, Any]]) -> dict[str, float]:
    """Median ms of each leg of the critical path."""
    con = sqlite3.connect(f"file:{d.state / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        ids = {m[0] for m in marks}
        ev: dict[str, dict[str, float]] = {}
        for eid, typ, t in con.execute("SELECT effect_id, type, time FROM events"):
            if eid in ids:
                ev.setdefault(eid, {})[typ] = t
    finally:
        con.close()
    legs: dict[str, list[float]] = {}

    def add(name: str, value: float | None) -> None:
        if value is not None:
            legs.setdefault(name, []).append(value * 1000)

    for eid, t0, t1, t2, rec in marks:
        e = ev.get(eid, {})
        final = e.get("finished") or e.get("succeeded")
        add("client: submit -> ack", t1 - t0)
        add("daemon: submitted -> running (same loop turn)", e["running"] - e["submitted"] if "running" in e else None)
        add("running -> worker started the effect (commit, assign, worker)",
            rec.started_at - e["running"] if "running" in e and rec.started_at else None)
        add("worker: started -> finished (no-op call)", rec.duration)
        add("worker finished -> daemon concluded", final - rec.finished_at if final and rec.finished_at else None)
        add("daemon concluded -> client wait returns (commit, reply)", t2 - final if final else None)
        add("total", t2 - t0)
    return {k: statistics.median(v) for k, v in legs.items()}


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("python_e2e", TITLE)
    strace = shutil.which("strace") is not None
    with BenchDaemon(*FLAGS, wait_workers=2) as d:
        c = d.client()
        for _ in range(min(50, sizes.python_n)):
            c.wait(c.submit_python("bench.fx:noop"))
        marks = []
        for _ in range(sizes.python_n):
            t0 = time.time()
            eid = c.submit_python("bench.fx:noop")
            t1 = time.time()
            rec = c.wait(eid)
            t2 = time.time()
            if not rec.succeeded:
                raise RuntimeError(f"noop effect {eid} ended {rec.state.value}: {rec.error}")
            marks.append((eid, t0, t1, t2, rec))
        legs = breakdown(d, marks)
    syncs = None
    if strace:
        n = min(200, sizes.python_n)
        with BenchDaemon(*FLAGS, strace_syncs=True, wait_workers=2) as d:
            c = d.client()
            for _ in range(20):
                c.wait(c.submit_python("bench.fx:noop"))
            s0 = d.sync_calls()
            for _ in range(n):
                c.wait(c.submit_python("bench.fx:noop"))
            syncs = (d.sync_calls() - s0) / n
    eff = summary([(t2 - t0) * 1000 for _, t0, _, t2, _ in marks])
    ppe = run_helper("bench.baselines:ppe_latency", sizes.python_n)
    res.details = {"effectd_ms": eff, "ppe_ms": ppe, "daemon_flags": " ".join(FLAGS),
                   "critical_path_p50_ms": legs, "daemon_syncs_per_effect": syncs}
    res.rows.append(Row("python no-op e2e p50", eff["p50"], "ms", ppe["p50"], "PPE(2) submit().result()",
                        "<= 2x baseline", eff["p50"] <= 2 * ppe["p50"], p99=eff["p99"], baseline_p99=ppe["p99"]))
    for name, value in legs.items():
        if name != "total":
            res.rows.append(Row(f"  leg p50: {name}", value, "ms"))
    if syncs is not None:
        res.rows.append(Row("  diag: daemon fsyncs per effect", syncs, "sync"))
    shared["python_e2e_p50"] = eff["p50"]
    return res
