"""Peers: Huey (SqliteHuey + consumer subprocess) and Ray, each in a fresh interpreter, compared
with effectd figures of this run (scenarios 2 and 3 when they ran, else measured here), and the
generator comparison: effectd python generator values/s via ``Client.values`` vs Ray's
``num_returns="streaming"`` item rate. A missing peer is skipped with the reason."""

from __future__ import annotations

import time
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper, summary, timed
from bench.scenarios import throughput


def effectd_reference(sizes: Sizes, shared: dict[str, Any], n_lat: int, n_tp: int) -> dict[str, Any]:
    """effectd's no-op latency p50 (scenario 2's when it ran) and throughput for the peer's own
    task count ``n_tp`` (measured here, so both sides do the same amount of work)."""
    key = f"peer_ref_{n_tp}"
    if key not in shared:
        with BenchDaemon(*throughput.FLAGS, wait_workers=2) as d:
            c = d.client()
            if "python_e2e_p50" in shared:
                p50, source = shared["python_e2e_p50"], "latency from scenario 2"
            else:
                p50 = summary(timed(lambda: c.wait(c.submit_python("bench.fx:noop")), n_lat, warmup=10))["p50"]
                source = f"latency measured here (n={n_lat})"
            tp = throughput.measure(d, n_tp, sizes.throughput_batch, sizes.throughput_timeout)
        shared[key] = {"p50": p50, "rate": tp["rate"], "source": f"{source}; throughput of {n_tp} measured here",
                       "throughput": tp}
    return shared[key]


def effectd_generator(items: int) -> dict[str, Any]:
    with BenchDaemon() as d:
        c = d.client()
        c.wait(c.submit_python("bench.fx:gen", [10]))
        t0 = time.perf_counter()
        eid = c.submit_python("bench.fx:gen", [items])
        got = 0
        for _ in c.values(eid):
            got += 1
        elapsed = time.perf_counter() - t0
        rec = c.wait(eid)
    return {"items": got, "seconds": elapsed, "items_per_s": got / elapsed, "state": rec.state.value}


def run_huey(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("peer_huey", "peer: Huey SqliteHuey, consumer -w 2 -k process")
    default = run_helper("bench.peers:huey_bench", sizes.huey_latency_n, sizes.huey_n, False)
    if "skipped" in default:
        res.skipped = default["skipped"]
        return res
    tuned = run_helper("bench.peers:huey_bench", sizes.huey_latency_n, sizes.huey_n, True)
    ref = effectd_reference(sizes, shared, sizes.huey_latency_n, sizes.huey_n)
    res.details = {"huey_default": default, "huey_tuned_1ms_polling": tuned, "effectd": ref}
    res.rows.append(Row("no-op e2e p50 vs Huey default", ref["p50"], "ms", default["latency_ms"]["p50"],
                        "Huey enqueue->get, default polling"))
    res.rows.append(Row("no-op e2e p50 vs Huey 1 ms polling", ref["p50"], "ms", tuned["latency_ms"]["p50"],
                        "Huey enqueue->get, 1 ms polling"))
    res.rows.append(Row("no-op throughput vs Huey", ref["rate"], "eff/s", default["rate"],
                        f"Huey {sizes.huey_n} tasks/s"))
    return res


def run_ray(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("peer_ray", "peer: Ray (num_cpus=2)")
    gen = effectd_generator(sizes.gen_items)
    ray = run_helper("bench.peers:ray_bench", sizes.ray_latency_n, sizes.ray_n, sizes.gen_items, timeout=900)
    if "skipped" in ray:
        res.skipped = ray["skipped"]
        res.details = {"effectd_generator": gen}
        res.rows.append(Row("python generator values/s (no Ray baseline)", gen["items_per_s"], "val/s"))
        return res
    ref = effectd_reference(sizes, shared, sizes.ray_latency_n, sizes.ray_n)
    res.details = {"ray": ray, "effectd": ref, "effectd_generator": gen}
    res.rows.append(Row(f"generator values/s ({sizes.gen_items} ints)", gen["items_per_s"], "val/s",
                        ray["items_per_s"], "Ray streaming generator items/s", ">= 10x baseline",
                        gen["items_per_s"] >= 10 * ray["items_per_s"]))
    res.rows.append(Row("no-op e2e p50 vs Ray", ref["p50"], "ms", ray["latency_ms"]["p50"],
                        "ray.get(noop.remote())", p99=None, baseline_p99=ray["latency_ms"]["p99"]))
    res.rows.append(Row("no-op throughput vs Ray", ref["rate"], "eff/s", ray["rate"], f"Ray {sizes.ray_n} tasks/s"))
    if gen["items"] != sizes.gen_items:
        res.error = f"effectd generator delivered {gen['items']} of {sizes.gen_items} values"
    return res
