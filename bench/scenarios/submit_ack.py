"""1. submit -> durable ack: ``Client.submit_sleep(0)`` round trip.

Baseline, measured in the same run: a raw pyzmq REQ/REP round trip over ipc between two processes
plus one ``os.fsync`` of a small file (the two things a durable ack cannot avoid)."""

from __future__ import annotations

from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper, summary, timed

TITLE = "submit -> durable ack (submit_sleep(0))"


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("submit_ack", TITLE)
    with BenchDaemon() as d:
        c = d.client()
        lat = timed(lambda: c.submit_sleep(0), sizes.submit_n, warmup=min(100, sizes.submit_n))
    eff = summary(lat)
    rr = run_helper("bench.baselines:reqrep", sizes.submit_n)
    fs = run_helper("bench.baselines:fsync_small", sizes.submit_n)
    base_p50 = rr["p50"] + fs["p50"]
    base_p99 = rr["p99"] + fs["p99"]
    res.details = {"effectd_ms": eff, "reqrep_ms": rr, "fsync_ms": fs}
    res.rows.append(Row("submit ack p50", eff["p50"], "ms", base_p50, "REQ/REP ipc + fsync",
                        "<= 2x baseline", eff["p50"] <= 2 * base_p50, p99=eff["p99"], baseline_p99=base_p99))
    res.rows.append(Row("  component: REQ/REP ipc rt p50", rr["p50"], "ms", p99=rr["p99"]))
    res.rows.append(Row("  component: fsync small file p50", fs["p50"], "ms", p99=fs["p99"]))
    return res
