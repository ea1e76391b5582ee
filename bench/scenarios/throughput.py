"""3. throughput of N no-op python effects: ``submit_many`` in batches, then ``wait_many``.

Daemon: ``--min-workers 2 --max-workers 2`` (a python effect takes a worker to itself; two workers
on two cores, like ``ProcessPoolExecutor(2)``). Baseline, same run: PPE(2) tasks/s."""

from __future__ import annotations

import time
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper
from effectd.client import python_spec

TITLE = "no-op python effects throughput"
FLAGS = ("--min-workers", "2", "--max-workers", "2")


def measure(d: BenchDaemon, n: int, batch: int) -> dict[str, Any]:
    c = d.client()
    spec = python_spec("bench.fx:noop")
    c.wait_many([c.submit(spec) for _ in range(4)])  # warm both workers
    t0 = time.perf_counter()
    ids: list[str] = []
    for i in range(0, n, batch):
        ids += c.submit_many([spec] * min(batch, n - i))
    t_submitted = time.perf_counter() - t0
    recs = c.wait_many(ids, timeout=600)
    elapsed = time.perf_counter() - t0
    ok = sum(1 for r in recs if r.succeeded)
    return {"n": n, "batch": batch, "seconds": elapsed, "submit_seconds": t_submitted,
            "rate": n / elapsed, "succeeded": ok}


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("throughput", TITLE)
    n = sizes.throughput_n
    with BenchDaemon(*FLAGS, wait_workers=2) as d:
        eff = measure(d, n, sizes.throughput_batch)
    ppe = run_helper("bench.baselines:ppe_throughput", n)
    res.details = {"effectd": eff, "ppe": ppe, "daemon_flags": " ".join(FLAGS)}
    res.rows.append(Row(f"{n} no-op python effects", eff["rate"], "eff/s", ppe["rate"], "PPE(2) tasks/s",
                        ">= 0.5x baseline", eff["rate"] >= 0.5 * ppe["rate"]))
    shared["throughput_rate"] = eff["rate"]
    if eff["succeeded"] != n:
        res.error = f"only {eff['succeeded']} of {n} effects succeeded"
    return res
