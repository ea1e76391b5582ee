"""2. no-op python effect end to end: ``submit_python("bench.fx:noop")`` + ``wait``.

Baseline, same run: ``ProcessPoolExecutor(2).submit(noop).result()`` on a warm pool."""

from __future__ import annotations

from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper, summary, timed

TITLE = "no-op python effect, submit + wait"


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("python_e2e", TITLE)
    with BenchDaemon("--min-workers", "2", "--max-workers", "2", wait_workers=2) as d:
        c = d.client()

        def one() -> None:
            rec = c.wait(c.submit_python("bench.fx:noop"))
            if not rec.succeeded:
                raise RuntimeError(f"noop effect {rec.id} ended {rec.state.value}: {rec.error}")

        lat = timed(one, sizes.python_n, warmup=min(50, sizes.python_n))
    eff = summary(lat)
    ppe = run_helper("bench.baselines:ppe_latency", sizes.python_n)
    res.details = {"effectd_ms": eff, "ppe_ms": ppe, "daemon_flags": "--min-workers 2 --max-workers 2"}
    res.rows.append(Row("python no-op e2e p50", eff["p50"], "ms", ppe["p50"], "PPE(2) submit().result()",
                        "<= 2x baseline", eff["p50"] <= 2 * ppe["p50"], p99=eff["p99"], baseline_p99=ppe["p99"]))
    shared["python_e2e_p50"] = eff["p50"]
    return res
