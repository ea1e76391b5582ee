"""8. line latency: a shell effect prints ``time.time()`` every 20 ms (flushed); a subscriber
(``Client.stream``) measures receive time - embedded time per line.

Baseline, same run: the same measurement over a raw PUB/SUB ipc link between two processes."""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper, summary

INTERVAL = 0.02


def producer(count: int) -> list[str]:
    code = (f"import time\nfor _ in range({count}):\n"
            f"    print(repr(time.time()), flush=True)\n    time.sleep({INTERVAL})\n")
    return [sys.executable, "-c", code]


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("line_latency", "line latency, one line per 20 ms")
    n = sizes.line_count
    lat: list[float] = []
    with BenchDaemon() as d:
        c = d.client()
        eid = c.submit_shell(producer(n))
        buf = b""
        for chunk in c.stream(eid, streams=("stdout",)):
            now = time.time()
            buf += chunk.data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    lat.append((now - float(line)) * 1000)
        rec = c.wait(eid)
    eff = summary(lat)
    base = run_helper("bench.baselines:pubsub_latency", n, INTERVAL)
    res.details = {"effectd_ms": eff, "pubsub_ms": base, "effect_state": rec.state.value}
    res.rows.append(Row("line latency p50", eff["p50"], "ms", base["p50"], "raw PUB/SUB ipc one-way",
                        "p50 < 5 ms", eff["p50"] < 5.0, p99=eff["p99"], baseline_p99=base["p99"]))
    if len(lat) != n:
        res.error = f"received {len(lat)} of {n} lines"
    return res
