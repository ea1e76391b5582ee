"""4. N x ``sleep 0.1`` shell effects with ``--parallel 16``: wall time vs the ideal N*0.1/16.

Also measured in the same run, for reference: the same sleeps as plain ``Popen`` processes, at most
16 at once (what spawning alone costs on this machine)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper
from effectd.client import shell_spec

TITLE = "N x sleep 0.1 shell effects, --parallel 16"
SECONDS = 0.1


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("sleep_parallel", TITLE)
    n, par = sizes.sleep_n, sizes.sleep_parallel
    ideal = n * SECONDS / par
    flags = ("--parallel", str(par))
    with BenchDaemon(*flags) as d:
        c = d.client()
        c.wait(c.submit_shell("true"))  # warm
        spec = shell_spec(["sleep", str(SECONDS)])
        t0 = time.perf_counter()
        ids = c.submit_many([spec] * n)
        recs = c.wait_many(ids, timeout=300)
        wall = time.perf_counter() - t0
    ok = sum(1 for r in recs if r.succeeded)
    outcomes = Counter(f"{r.state.value}: {r.reason}" for r in recs)
    durations = sorted(r.duration or 0.0 for r in recs)
    raw = run_helper("bench.baselines:popen_sleeps", n, par, SECONDS)
    res.details = {"n": n, "parallel": par, "wall_s": wall, "ideal_s": ideal, "succeeded": ok,
                   "outcomes": dict(outcomes),
                   "effect_duration_p50_s": durations[len(durations) // 2], "popen_pool": raw,
                   "daemon_flags": " ".join(flags)}
    res.rows.append(Row(f"{n} x sleep {SECONDS} /{par} wall", wall, "s", ideal, f"ideal {n}x{SECONDS}/{par}",
                        "<= 1.3x ideal", wall <= 1.3 * ideal))
    res.rows.append(Row("  reference: plain Popen pool wall", raw["seconds"], "s", ideal, "ideal"))
    if ok != n:
        res.error = f"only {ok} of {n} effects succeeded: {dict(outcomes)}"
    return res
