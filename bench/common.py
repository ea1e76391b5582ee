"""Shared pieces of the benchmark: an isolated daemon, statistics, result rows, subprocess helpers.

Every daemon the benchmark starts lives in its own short temporary directory under /tmp (ipc
socket paths are limited to 107 bytes), gets PYTHONPATH with the repository root so its workers
can import ``bench.fx``, and is stopped at the end together with everything it started: its
workers (found by ``--runtime-dir`` in their command line) and any effect process (found by the
``EFFECTD_EFFECT_ID`` marker in its environment).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
MARKER = "EFFECTD_EFFECT_ID"


# ---- sizes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does. ``full`` is the real benchmark; ``quick`` keeps the whole
    run under ~2 minutes; ``tiny`` only proves every scenario runs (for the smoke test)."""

    mode: str
    submit_n: int
    python_n: int
    throughput_n: int
    throughput_batch: int
    throughput_timeout: float
    sleep_n: int
    sleep_parallel: int
    cli_runs: int
    cold_runs: int
    stream_bytes: int
    line_count: int
    concurrency: tuple[int, ...]
    submitter_seconds: float
    sqlite_rows: int
    huey_n: int
    huey_latency_n: int
    ray_n: int
    ray_latency_n: int
    gen_items: int


FULL = Sizes("full", submit_n=3000, python_n=2000, throughput_n=10_000, throughput_batch=500, throughput_timeout=300,
             sleep_n=200, sleep_parallel=16, cli_runs=15, cold_runs=5, stream_bytes=1 << 30,
             line_count=500, concurrency=(1, 8, 32), submitter_seconds=5.0, sqlite_rows=3000,
             huey_n=1000, huey_latency_n=100, ray_n=1000, ray_latency_n=1000, gen_items=10_000)
QUICK = Sizes("quick", submit_n=500, python_n=300, throughput_n=1000, throughput_batch=250, throughput_timeout=120,
              sleep_n=200, sleep_parallel=16, cli_runs=5, cold_runs=2, stream_bytes=64 << 20,
              line_count=100, concurrency=(1, 8, 32), submitter_seconds=1.5, sqlite_rows=1000,
              huey_n=300, huey_latency_n=30, ray_n=300, ray_latency_n=200, gen_items=3000)
TINY = Sizes("tiny", submit_n=60, python_n=30, throughput_n=100, throughput_batch=50, throughput_timeout=60,
             sleep_n=32, sleep_parallel=16, cli_runs=2, cold_runs=1, stream_bytes=4 << 20,
             line_count=15, concurrency=(1, 8, 32), submitter_seconds=0.5, sqlite_rows=200,
             huey_n=30, huey_latency_n=5, ray_n=50, ray_latency_n=20, gen_items=500)


# ---- statistics --------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, p99, min, max and count of a latency sample (same unit as the input)."""
    return {"p50": statistics.median(values) if values else math.nan, "p99": percentile(values, 99),
            "min": min(values) if values else math.nan, "max": max(values) if values else math.nan,
            "n": len(values)}


def timed(fn: Callable[[], Any], n: int, warmup: int = 0) -> list[float]:
    """Latencies of ``n`` sequential calls in milliseconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


# ---- result rows -------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the results table.

    ``figure`` and ``baseline`` are in ``unit``; ``ratio`` is figure / baseline. ``target`` says in
    words what the issue asks; ``met`` is True/False, or None when the row has no target."""

    metric: str
    figure: float
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    target: str = ""
    met: bool | None = None
    p99: float | None = None
    baseline_p99: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline not in (None, 0) and self.figure is not None:
            self.ratio = self.figure / self.baseline  # type: ignore[operator]


@dataclass
class ScenarioResult:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "skipped": self.skipped, "error": self.error, "notes": self.notes,
                "seconds": round(self.seconds, 3),
                "rows": [{k: v for k, v in r.__dict__.items()} for r in self.rows],
                "details": self.details}


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    a = abs(value)
    if a >= 1000:
        text = f"{value:,.0f}"
    elif a >= 100:
        text = f"{value:.0f}"
    elif a >= 10:
        text = f"{value:.1f}"
    elif a >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip()


# ---- subprocess helpers ------------------------------------------------------------------------

def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env.update(extra or {})
    return env


def run_helper(func: str, *args: Any, timeout: float = 600.0) -> Any:
    """Run ``func`` ("module:function") in a fresh interpreter and return its JSON result.

    Baselines run in their own process so that forking (ProcessPoolExecutor) and extra threads
    (zmq contexts, Ray) never mix with the benchmark driver's own sockets."""
    proc = subprocess.run([sys.executable, "-m", "bench.helpers", func, json.dumps(list(args))],
                          env=bench_env(), cwd=REPO, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"helper {func} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-3000:]}")
    lines = proc.stdout.decode().strip().splitlines()
    return json.loads(lines[-1])


def short_tmp(prefix: str = "eb-") -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o700)
    return path


# ---- an isolated daemon ------------------------------------------------------------------------

class BenchDaemon:
    """A real effectd daemon in its own temp dirs. Use as a context manager.

    ``strace_syncs=True`` runs it under ``strace -f --seccomp-bpf -e trace=fsync,fdatasync`` so the
    sync system calls of the daemon process can be counted (only those calls stop the tracee, so
    the overhead is one ptrace stop per sync)."""

    def __init__(self, *args: str, strace_syncs: bool = False, root: Path | None = None,
                 wait_workers: int = 1) -> None:
        self.root = root or short_tmp()
        self.runtime = self.root / "r"
        self.state = self.root / "s"
        self.args = list(args)
        self.env = bench_env({"EFFECTD_RUNTIME_DIR": str(self.runtime), "EFFECTD_STATE_DIR": str(self.state),
                              "EFFECTD_LOG_LEVEL": "WARNING"})
        self.strace_syncs = strace_syncs
        self.strace_prefix = self.root / "sync"
        self.wait_workers = wait_workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.clients: list[Any] = []

    # lifecycle

    def __enter__(self) -> BenchDaemon:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        argv = [sys.executable, "-m", "effectd.daemon.main", *self.args]
        if self.strace_syncs:
            if shutil.which("strace") is None:
                raise RuntimeError("strace is not installed")
            argv = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=fsync,fdatasync", "-ff",
                    "-o", str(self.strace_prefix), *argv]
        with open(self.root / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         cwd=REPO)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        from effectd.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.runtime, state=self.state, autostart=False, timeout=0.5, retries=0) as c:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
                with contextlib.suppress(Exception):
                    info = c.hello()
                    self.pid = int(info["pid"])
                    ready = sum(1 for w in info["workers"] if w["state"] == "ready")
                    if ready >= self.wait_workers:
                        return
                time.sleep(0.02)  # bounded startup poll
        raise RuntimeError(f"daemon did not become ready: {self.log()}")

    def client(self, **kwargs: Any) -> Any:
        from effectd.client import Client

        kwargs.setdefault("autostart", False)
        kwargs.setdefault("timeout", 30.0)
        c = Client(self.runtime, state=self.state, **kwargs)
        self.clients.append(c)
        return c

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "daemon.log").read_text(errors="replace")[-4000:]
        return ""

    # inspection

    def worker_processes(self) -> list[psutil.Process]:
        return worker_processes(self.runtime)

    def rss_bytes(self) -> tuple[int, int, int]:
        """(daemon RSS, sum of workers' RSS, number of workers)."""
        daemon = 0
        with contextlib.suppress(psutil.Error):
            daemon = psutil.Process(self.pid).memory_info().rss
        workers = 0
        procs = self.worker_processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                workers += p.memory_info().rss
        return daemon, workers, len(procs)

    def sync_calls(self) -> int:
        """fsync + fdatasync calls made so far by the daemon process itself (strace mode only)."""
        return count_strace_lines(self.strace_prefix, self.pid)

    # teardown

    def stop(self) -> list[str]:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        self.clients = []
        leaked: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            target = self.pid or self.proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGTERM)
                os.kill(target, signal.SIGTERM)  # second signal: stop at once, no drain
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(5)
        leaked += kill_leftovers(self.runtime, self.state)
        shutil.rmtree(self.root, ignore_errors=True)
        return leaked


def count_strace_lines(prefix: Path, pid: int) -> int:
    path = Path(f"{prefix}.{pid}")
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if b"sync(" in line and b"resumed>" not in line)
    except OSError:
        return 0


def worker_processes(runtime: Path) -> list[psutil.Process]:
    out = []
    needle = str(runtime)
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "effectd.daemon.worker" in cmd and needle in cmd:
            out.append(p)
    return out


def _effect_ids(state: Path) -> set[str]:
    import sqlite3

    db = state / "journal.sqlite3"
    if not db.exists():
        return set()
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return {r[0] for r in con.execute("SELECT id FROM effects")}
        finally:
            con.close()
    except sqlite3.Error:
        return set()


def kill_leftovers(runtime: Path, state: Path, grace: float = 10.0) -> list[str]:
    """Wait for this daemon's workers and effect processes to exit; kill and describe survivors."""
    ids = _effect_ids(state)
    procs = worker_processes(runtime)
    if ids:
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARKER) in ids:
                    procs.append(p)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    out = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            out.append(f"pid {p.pid}: {' '.join(p.cmdline())}")
            p.kill()
    return out


@contextlib.contextmanager
def sampling_rss(daemon: BenchDaemon, interval: float = 0.05) -> Iterator[dict[str, Any]]:
    """Sample daemon + workers RSS in a thread while the block runs; yields a dict filled at exit."""
    import threading

    out: dict[str, Any] = {"samples": 0, "max_total": 0, "max_daemon": 0, "max_workers": 0}
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            d, w, _ = daemon.rss_bytes()
            out["samples"] += 1
            out["max_total"] = max(out["max_total"], d + w)
            out["max_daemon"] = max(out["max_daemon"], d)
            out["max_workers"] = max(out["max_workers"], w)
            stop.wait(interval)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join(5)
