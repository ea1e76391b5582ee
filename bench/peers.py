"""Peer systems measured in fresh interpreters (via ``common.run_helper``): Huey and Ray.

Each function returns JSON data, or ``{"skipped": reason}`` when the peer is not importable."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import REPO, bench_env, summary


def huey_bench(latency_n: int, n: int, tuned: bool) -> dict[str, Any]:
    """SqliteHuey with a ``huey_consumer -w 2 -k process`` subprocess: enqueue -> result latency
    (sequential) and ``n`` no-op tasks enqueued at once then collected. ``tuned`` polls every 1 ms
    on both sides instead of Huey's defaults."""
    try:
        import huey  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"huey not importable: {exc}"}
    import psutil

    tmp = tempfile.mkdtemp(prefix="ebh-", dir="/tmp")
    db = os.path.join(tmp, "huey.db")
    os.environ["EB_HUEY_DB"] = db
    env = bench_env({"EB_HUEY_DB": db})
    consumer = shutil.which("huey_consumer") or "huey_consumer"
    argv = [consumer, "bench.peer_huey_tasks.huey", "-w", "2", "-k", "process"]
    if tuned:
        argv += ["-d", "0.001", "-m", "0.001", "-b", "1"]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    get_kw: dict[str, Any] = {"blocking": True, "timeout": 60}
    if tuned:
        get_kw.update(backoff=1.0, max_delay=0.001)
    try:
        from bench.peer_huey_tasks import noop

        noop().get(**get_kw)  # consumer up and warm
        for _ in range(10):
            noop().get(**get_kw)
        lat = []
        for _ in range(latency_n):
            t0 = time.perf_counter()
            noop().get(**get_kw)
            lat.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        results = [noop() for _ in range(n)]
        for r in results:
            r.get(**get_kw)
        elapsed = time.perf_counter() - t0
    finally:
        children = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        _, alive = psutil.wait_procs(children, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"tuned": tuned, "latency_ms": summary(lat), "n": n, "seconds": elapsed, "rate": n / elapsed}


def ray_bench(latency_n: int, n: int, items: int) -> dict[str, Any]:
    """Ray: ``ray.remote`` no-op round trip (warm), ``n`` no-op tasks, and a
    ``num_returns="streaming"`` generator of ``items`` ints consumed with ``ray.get`` per ref."""
    try:
        t0 = time.perf_counter()
        import ray
        import_s = time.perf_counter() - t0
    except ImportError as exc:
        return {"skipped": f"ray not importable: {exc}"}
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    try:
        @ray.remote
        def noop() -> None:
            return None

        @ray.remote(num_returns="streaming")
        def gen(k: int) -> Any:
            for i in range(k):  # noqa: UP028 - Ray rejects `yield from` here (no .send on range)
                yield i

        ray.get([noop.remote() for _ in range(20)])
        lat = []
        for _ in range(latency_n):
            t0 = time.perf_counter()
            ray.get(noop.remote())
            lat.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        ray.get([noop.remote() for _ in range(n)])
        tp_s = time.perf_counter() - t0
        for ref in gen.remote(100):  # warm the generator path
            ray.get(ref)
        t0 = time.perf_counter()
        got = 0
        for ref in gen.remote(items):
            ray.get(ref)
            got += 1
        gen_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"import_s": import_s, "init_s": init_s, "latency_ms": summary(lat), "n": n, "seconds": tp_s,
            "rate": n / tp_s, "items": got, "gen_seconds": gen_s, "items_per_s": got / gen_s,
            "python": sys.version.split()[0], "ray_version": ray.__version__}
