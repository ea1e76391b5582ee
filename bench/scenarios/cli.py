"""5. ``effectctl run -- true`` warm (daemon running) and cold (autostart), and
6. ``effectctl status ID``; wall time of the whole command, medians over several runs.

Baselines, same run and same way (``subprocess.run`` from the driver): ``python -c pass``,
``python -c 'import zmq, msgpack, click'`` and ``subprocess.run(['true'])``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BenchDaemon,
    Row,
    ScenarioResult,
    Sizes,
    bench_env,
    kill_leftovers,
    short_tmp,
    summary,
)

IMPORTS = "import zmq, msgpack, click"


def effectctl() -> list[str]:
    exe = shutil.which("effectctl")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from effectd.cli import main; sys.exit(main())"]


def wall(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    dt = (time.perf_counter() - t0) * 1000
    if check and p.returncode != 0:
        raise RuntimeError(f"{argv} exited {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    return dt


def samples(argv: list[str], n: int, env: dict[str, str] | None = None, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        wall(argv, env)
    return summary([wall(argv, env) for _ in range(n)])


def baselines(n: int) -> dict[str, dict[str, float]]:
    return {
        "python_pass": samples([sys.executable, "-c", "pass"], n),
        "python_imports": samples([sys.executable, "-c", IMPORTS], n),
        "true": samples(["true"], max(n, 20)),
    }


def cold_run(env_base: dict[str, str]) -> tuple[float, list[str]]:
    """One ``effectctl run -- true`` with no daemon for a fresh runtime dir (autostart), then stop
    the daemon it started and everything that daemon started."""
    root = short_tmp("ec-")
    runtime, state = root / "r", root / "s"
    env = dict(env_base, EFFECTD_RUNTIME_DIR=str(runtime), EFFECTD_STATE_DIR=str(state))
    try:
        dt = wall([*effectctl(), "run", "--", "true"], env)
    finally:
        leaked = stop_autostarted(runtime, state)
        shutil.rmtree(root, ignore_errors=True)
    return dt, leaked


def stop_autostarted(runtime: Path, state: Path) -> list[str]:
    from effectd.client.autostart import running_pid

    pid = running_pid(runtime)
    if pid and pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while running_pid(runtime) is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # bounded wait for the detached daemon to release its lock
    return kill_leftovers(runtime, state)


def run_cli(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("cli_run", "effectctl run -- true (warm / cold)")
    base = baselines(sizes.cli_runs)
    shared["cli_baselines"] = base
    with BenchDaemon() as d:
        warm = samples([*effectctl(), "run", "--", "true"], sizes.cli_runs, d.env)
        c = d.client()
        rec = c.wait(c.submit_shell(["true"]))
        effect_ms = (rec.duration or 0.0) * 1000
    env = bench_env({"EFFECTD_LOG_LEVEL": "WARNING"})
    cold_times, leaked = [], []
    for _ in range(sizes.cold_runs):
        dt, lk = cold_run(env)
        cold_times.append(dt)
        leaked += lk
    cold = summary(cold_times)
    imp = base["python_imports"]["p50"]
    effect_time = base["true"]["p50"]
    bound = 2 * imp + effect_time
    res.details = {"warm_ms": warm, "cold_ms": cold, "baselines_ms": base,
                   "effect_duration_in_daemon_ms": effect_ms, "leaked": leaked,
                   "target_reading": "warm <= 2 x (python -c 'import zmq, msgpack, click') + subprocess.run(['true'])"}
    res.rows.append(Row("effectctl run -- true, warm p50", warm["p50"], "ms", imp, f"python -c '{IMPORTS}'",
                        "<= 2x imports + true", warm["p50"] <= bound, p99=warm["p99"],
                        baseline_p99=base["python_imports"]["p99"]))
    res.rows.append(Row("effectctl run -- true, cold p50", cold["p50"], "ms", imp, f"python -c '{IMPORTS}'",
                        p99=cold["p99"]))
    res.rows.append(Row("  baseline: python -c pass p50", base["python_pass"]["p50"], "ms"))
    res.rows.append(Row("  baseline: subprocess.run(['true']) p50", effect_time, "ms"))
    if leaked:
        res.error = f"processes survived the autostarted daemons: {leaked}"
    return res


def run_status(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("cli_status", "effectctl status ID")
    base = shared.get("cli_baselines") or baselines(sizes.cli_runs)
    with BenchDaemon() as d:
        c = d.client()
        eid = c.submit_sleep(0)
        c.wait(eid)
        st = samples([*effectctl(), "status", eid], sizes.cli_runs, d.env)
    imp = base["python_imports"]
    res.details = {"status_ms": st, "python_imports_ms": imp}
    res.rows.append(Row("effectctl status ID p50", st["p50"], "ms", imp["p50"], f"python -c '{IMPORTS}'",
                        p99=st["p99"], baseline_p99=imp["p99"]))
    return res
