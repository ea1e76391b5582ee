"""3. throughput of N no-op python effects: ``submit_many`` in batches, then ``wait_many`` on all ids.

Daemon: ``--min-workers 2 --max-workers 2`` (a python effect takes a worker to itself; two workers
on two cores, like ``ProcessPoolExecutor(2)``). Baseline, same run: PPE(2) tasks/s.

A second pass (fresh daemon) waits batch by batch (``wait_many`` on at most one batch of ids at a
time) instead of on all N ids at once: the difference shows what a large parked wait costs the
daemon. Each pass is capped at ``throughput_timeout`` seconds; the rate is completed / elapsed."""

from __future__ import annotations

import time
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper
from effectd.client import python_spec

TITLE = "no-op python effects throughput"
FLAGS = ("--min-workers", "2", "--max-workers", "2")


def measure(d: BenchDaemon, n: int, batch: int, timeout: float, per_batch: bool = False) -> dict[str, Any]:
    c = d.client()
    spec = python_spec("bench.fx:noop")
    c.wait_many([c.submit(spec) for _ in range(4)])  # warm both workers
    t0 = time.perf_counter()
    batches: list[list[str]] = []
    for i in range(0, n, batch):
        batches.append(c.submit_many([spec] * min(batch, n - i)))
    t_submitted = time.perf_counter() - t0
    deadline = t0 + timeout
    recs = []
    if per_batch:
        for ids in batches:
            recs += c.wait_many(ids, timeout=max(0.0, deadline - time.perf_counter()))
    else:
        recs = c.wait_many([i for ids in batches for i in ids], timeout=timeout)
    elapsed = time.perf_counter() - t0
    done = sum(1 for r in recs if r.final)
    ok = sum(1 for r in recs if r.succeeded)
    for ids in batches:  # whatever is left must not keep the daemon busy while it stops
        pending = [r.id for r in c.status_many(ids) if not r.final]
        if pending:
            c.cancel(*pending)
    return {"n": n, "batch": batch, "wait": "per batch" if per_batch else "all ids at once",
            "seconds": elapsed, "submit_seconds": t_submitted, "finished": done, "succeeded": ok,
            "timed_out": done < n, "rate": done / elapsed}


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("throughput", TITLE)
    n = sizes.throughput_n
    with BenchDaemon(*FLAGS, wait_workers=2) as d:
        eff = measure(d, n, sizes.throughput_batch, sizes.throughput_timeout)
    with BenchDaemon(*FLAGS, wait_workers=2) as d:
        per = measure(d, n, sizes.throughput_batch, sizes.throughput_timeout, per_batch=True)
    ppe = run_helper("bench.baselines:ppe_throughput", n)
    res.details = {"effectd": eff, "effectd_wait_per_batch": per, "ppe": ppe, "daemon_flags": " ".join(FLAGS)}
    res.rows.append(Row(f"{n} no-op python effects, wait_many(all)", eff["rate"], "eff/s", ppe["rate"],
                        "PPE(2) tasks/s", ">= 0.5x baseline", eff["rate"] >= 0.5 * ppe["rate"]))
    res.rows.append(Row(f"  same, wait_many per {sizes.throughput_batch}-id batch", per["rate"], "eff/s",
                        ppe["rate"], "PPE(2) tasks/s"))
    shared["throughput_rate"] = eff["rate"]
    errors = []
    for label, m in (("wait_many(all)", eff), ("per batch", per)):
        if m["timed_out"]:
            errors.append(f"{label}: only {m['finished']} of {n} finished within {sizes.throughput_timeout:.0f}s")
        elif m["succeeded"] != n:
            errors.append(f"{label}: only {m['succeeded']} of {n} succeeded")
    res.error = "; ".join(errors) or None
    return res
