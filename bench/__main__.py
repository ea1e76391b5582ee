"""``python -m bench``: run the effectd benchmark and print a table.

    python -m bench                    # full sizes (10k effects, 1 GiB stream, ...)
    python -m bench --quick            # small sizes, under ~2 minutes
    python -m bench --tiny             # smallest sizes: proves every scenario runs (smoke test)
    python -m bench --only submit_ack,streaming --json out.json
    python -m bench --list

Every scenario starts its own isolated daemon (temp dirs under /tmp) with the flags it needs,
measures its baseline in the same run, and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import FULL, QUICK, REPO, TINY, Row, ScenarioResult, Sizes, fmt

Runner = Callable[[Sizes, dict[str, Any]], ScenarioResult]


def scenarios() -> list[tuple[str, str, Runner]]:
    from bench.scenarios import (
        cli,
        line_latency,
        peers,
        python_e2e,
        rss,
        sleep_parallel,
        streaming,
        submit_ack,
        submitters,
        throughput,
    )

    return [
        ("submit_ack", "1. submit -> durable ack", submit_ack.run),
        ("python_e2e", "2. no-op python effect end to end", python_e2e.run),
        ("throughput", "3. no-op python effects throughput", throughput.run),
        ("sleep_parallel", "4. 200 x sleep 0.1 at --parallel 16", sleep_parallel.run),
        ("cli_run", "5. effectctl run -- true, warm and cold", cli.run_cli),
        ("cli_status", "6. effectctl status ID", cli.run_status),
        ("streaming", "7. bulk streaming live and replay", streaming.run),
        ("line_latency", "8. line latency", line_latency.run),
        ("submitters", "9. concurrent submitters 1/8/32", submitters.run),
        ("rss", "10. RSS idle and under streaming", rss.run),
        ("peer_huey", "peer: Huey", peers.run_huey),
        ("peer_ray", "peer: Ray", peers.run_ray),
    ]


def machine() -> dict[str, Any]:
    import sqlite3

    import msgpack
    import psutil
    import zmq

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import effectd

    return {"cpu": model, "cores": os.cpu_count(), "git": git_revision(), "load": load(),
            "effectd_from": os.path.dirname(os.path.abspath(effectd.__file__)), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
            "psutil": psutil.__version__, "sqlite": sqlite3.sqlite_version, "kernel": platform.release(),
            "memory_GB": round(psutil.virtual_memory().total / 1e9, 1)}


def run_snapshot(rev: str, argv: list[str]) -> int:
    """Export ``rev`` to a temp dir and run this same benchmark from there (its effectd, its bench)."""
    import shutil
    import subprocess
    import tempfile

    rest = []
    skip_next = False
    for i, a in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if a == "--snapshot":
            skip_next = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if a.startswith("--snapshot="):
            continue
        rest.append(a)
    for i, a in enumerate(rest):  # a relative --json path stays relative to where we were called
        if a == "--json" and i + 1 < len(rest):
            rest[i + 1] = os.path.abspath(rest[i + 1])
        elif a.startswith("--json="):
            rest[i] = "--json=" + os.path.abspath(a.split("=", 1)[1])
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    root = tempfile.mkdtemp(prefix="eb-src-", dir="/tmp")
    try:
        archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", root], input=archive.stdout, check=True)
        env = dict(os.environ, PYTHONPATH=root, EFFECTD_BENCH_REVISION=f"{sha} (clean export)")
        print(f"measuring a clean export of {rev} = {sha} in {root}", flush=True)
        return subprocess.run([sys.executable, "-m", "bench", *rest], cwd=root, env=env).returncode
    finally:
        shutil.rmtree(root, ignore_errors=True)


def git_revision() -> str:
    """HEAD of the effectd checkout being measured, plus '+dirty' and the changed paths."""
    import subprocess

    if os.environ.get("EFFECTD_BENCH_REVISION"):
        return os.environ["EFFECTD_BENCH_REVISION"]

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f"+dirty({', '.join(changed)})" if changed else "")


def load() -> str:
    """Load average and how many other effectd daemons run on the machine (they share the CPUs)."""
    import psutil

    others = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "effectd.daemon.main" in cmd:
            others += 1
    one, five, _ = os.getloadavg()
    return f"loadavg {one:.2f}/{five:.2f}, {others} other effectd daemon(s) running"


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return "-"
    return f"{row.ratio:.4f}x" if abs(row.ratio) < 0.01 else f"{row.ratio:.2f}x"


def table(results: list[ScenarioResult]) -> str:
    head = ["scenario", "metric", "effectd p50 / rate", "p99", "baseline (same run)", "base p99",
            "ratio", "target", "met?"]
    rows: list[list[str]] = []
    for r in results:
        if r.skipped:
            rows.append([r.key, f"SKIPPED: {r.skipped}", "", "", "", "", "", "", ""])
        if r.error and not r.rows:
            rows.append([r.key, f"ERROR: {r.error.splitlines()[0][:90]}", "", "", "", "", "", "", ""])
        for i, row in enumerate(r.rows):
            base = fmt(row.baseline, row.unit) if row.baseline is not None else "-"
            if row.baseline_what and row.baseline is not None:
                base = f"{base} ({row.baseline_what})"
            met = "-" if row.met is None else ("yes" if row.met else "NO")
            rows.append([r.key if i == 0 else "", row.metric, fmt(row.figure, row.unit),
                         fmt(row.p99, row.unit) if row.p99 is not None else "",
                         base, fmt(row.baseline_p99, row.unit) if row.baseline_p99 is not None else "",
                         _ratio(row), row.target or "", met])
        if r.error and r.rows:
            rows.append(["", f"ERROR: {r.error.splitlines()[0][:90]}", "", "", "", "", "", "", ""])
        for note in r.notes:
            rows.append(["", f"note: {note[:160]}", "", "", "", "", "", "", ""])
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[1] = min(widths[1], 60)
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    for x in rows:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip())
    return "\n".join(lines)


def markdown_table(results: list[ScenarioResult]) -> str:
    out = ["| scenario | metric | effectd p50 / rate | p99 | baseline (same run) | base p99 | ratio | target | met? |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped:
            out.append(f"| {r.key} | skipped: {r.skipped} | | | | | | | |")
        for i, row in enumerate(r.rows):
            base = fmt(row.baseline, row.unit) if row.baseline is not None else "-"
            if row.baseline_what and row.baseline is not None:
                base = f"{base} ({row.baseline_what})"
            met = "-" if row.met is None else ("yes" if row.met else "**NO**")
            out.append(f"| {r.key if i == 0 else ''} | {row.metric.strip()} | {fmt(row.figure, row.unit)} | "
                       f"{fmt(row.p99, row.unit) if row.p99 is not None else ''} | {base} | "
                       f"{fmt(row.baseline_p99, row.unit) if row.baseline_p99 is not None else ''} | "
                       f"{_ratio(row)} | {row.target} | {met} |")
        if r.error:
            out.append(f"| | error: {r.error.splitlines()[0][:200]} | | | | | | | |")
        for note in r.notes:
            out.append(f"| | note: {note} | | | | | | | |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under ~2 minutes in total")
    size.add_argument("--tiny", action="store_true", help="smallest sizes (smoke test: every scenario runs)")
    p.add_argument("--json", metavar="FILE", help="also write all results and details as JSON")
    p.add_argument("--only", metavar="SCENARIO[,..]", help="run only these scenarios (see --list)")
    p.add_argument("--skip", metavar="SCENARIO[,..]", help="run all but these scenarios")
    p.add_argument("--list", action="store_true", help="list scenario keys and exit")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    p.add_argument("--snapshot", metavar="REV", nargs="?", const="HEAD",
                   help="measure a clean export of git REV (default HEAD) instead of the working tree, "
                        "so edits in progress cannot change the code mid-run")
    args = p.parse_args(argv)
    if args.snapshot:
        return run_snapshot(args.snapshot, sys.argv[1:] if argv is None else argv)
    if os.environ.get("EFFECTD_BENCH_TINY") and not args.quick:
        args.tiny = True

    all_scenarios = scenarios()
    if args.list:
        for key, title, _ in all_scenarios:
            print(f"{key:16} {title}")
        return 0
    keys = [k for k, _, _ in all_scenarios]
    chosen = keys
    if args.only:
        chosen = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in chosen if k not in keys]
        if unknown:
            p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(keys)}")
    if args.skip:
        skip = {k.strip() for k in args.skip.split(",")}
        chosen = [k for k in chosen if k not in skip]
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    os.chdir(REPO)  # python effects default their cwd to ours: bench.fx must import from here

    info = machine()
    print(f"effectd bench, mode {sizes.mode}: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
          f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']}), msgpack {info['msgpack']}, "
          f"psutil {info['psutil']}, SQLite {info['sqlite']}\n"
          f"effectd at {info['git']} ({info['effectd_from']}); {info['load']}", flush=True)
    shared: dict[str, Any] = {}
    results: list[ScenarioResult] = []
    t_all = time.perf_counter()
    for key, title, runner in all_scenarios:
        if key not in chosen:
            continue
        print(f"-- {title} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            res = runner(sizes, shared)
        except Exception as exc:
            res = ScenarioResult(key, title, error=f"{type(exc).__name__}: {exc}")
            res.details["traceback"] = traceback.format_exc()
        res.seconds = time.perf_counter() - t0
        results.append(res)
        status = "skipped" if res.skipped else "ERROR" if res.error else "done"
        print(f"{status} in {res.seconds:.1f}s", flush=True)
    total = time.perf_counter() - t_all
    info["load_at_end"] = load()
    print()
    print(table(results))
    if args.markdown:
        print()
        print(markdown_table(results))
    print(f"\ntotal {total:.1f}s; at the end: {info['load_at_end']}")
    if args.json:
        doc = {"mode": sizes.mode, "sizes": sizes.__dict__, "machine": info, "argv": sys.argv,
               "total_seconds": total, "scenarios": {r.key: r.to_json() for r in results}}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str, allow_nan=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
