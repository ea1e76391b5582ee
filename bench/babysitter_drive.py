"""Benchmark: ``effectctl babysitter drive`` against two hand-written executors, on the same
babysitter process, side by side.

    python bench/babysitter_drive.py [--babysitter PATH] [--repeat N] [--phase1 0,1,2,3]
                                     [--phase2 3] [--json]

The process (written to a temporary directory next to a ``node_modules`` link to the SDK's) is a
two-phase fan-out: one ``ctx.parallel.all`` of four shell tasks (``sleep d && echo ...``, d =
0, 1, 2, 3 s by default), then one ``ctx.parallel.all`` of three instant shell tasks that use the
phase-1 results. Executors:

* **serial**: iterate, run the first pending task (subprocess), post it, iterate, ...
* **parallel** (the plain parallel executor): iterate, start every new task in a thread
  (subprocess), and as each one finishes post it and iterate at once; repeat.
* **drive**: :func:`effectd.babysitter.drive` with an isolated effectd daemon started here.

Each executor works on its own fresh run; all must produce the same output. Every babysitter CLI
call costs one Node start (~0.3-0.5 s), so the number of calls on the critical path decides the
time. Reported: wall time per executor (median of ``--repeat`` runs), the number of iterate/post
calls, and drive / parallel. Needs node, the SDK (``bash tests/babysitter_sdk.sh``) and effectd.
Stand-alone: it does not use the rest of ``bench/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from effectd.babysitter import (  # noqa: E402
    BabysitterCli,
    PendingEffect,
    drive,
    parse_shell_task,
    shell_argv,
    shell_result_value,
)

SDK_PACKAGE = "@a5c-ai/babysitter-sdk"
DEFAULT_SDK_BIN = Path.home() / ".cache" / "effectd-test" / "babysitter-sdk" / "node_modules" / ".bin" / "babysitter"

PROCESS = """\
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command, timeout: 60000 },
}));

export async function process(inputs, ctx) {
  const run = (name, command) => () => ctx.task(shellStep, { title: name, command }, { label: name });
  const phase1 = await ctx.parallel.all(
    inputs.phase1.map((seconds, i) => run(`p1-${i}`, `sleep ${seconds} && echo p1-${i}`)),
  );
  const joined = phase1.map((r) => String(r).trim()).join(",");
  const phase2 = await ctx.parallel.all(
    Array.from({ length: inputs.phase2 }, (_, i) => run(`p2-${i}`, `echo p2-${i} after ${joined}`)),
  );
  return { phase1, phase2 };
}
"""


# ---- setup ---------------------------------------------------------------------------------------

def find_sdk_binary(given: str | None) -> Path:
    if given:
        return Path(given)
    env_dir = os.environ.get("EFFECTD_BABYSITTER_SDK_DIR")
    if env_dir:
        return Path(env_dir) / "node_modules" / ".bin" / "babysitter"
    if DEFAULT_SDK_BIN.exists():
        return DEFAULT_SDK_BIN
    found = shutil.which("babysitter")
    if found:
        return Path(found)
    sys.exit("babysitter SDK not found: run `bash tests/babysitter_sdk.sh` or pass --babysitter")


def node_modules_of(binary: Path) -> Path:
    for parent in binary.resolve().parents:
        if parent.name == "node_modules" and (parent / SDK_PACKAGE).is_dir():
            return parent
    sys.exit(f"{binary} is not inside a node_modules holding {SDK_PACKAGE}")


class Daemon:
    """An isolated effectd daemon in a short temporary directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ebd-", dir="/tmp"))
        self.runtime, self.state = self.root / "run", self.root / "state"
        env = dict(os.environ)
        env.update({"EFFECTD_RUNTIME_DIR": str(self.runtime), "EFFECTD_STATE_DIR": str(self.state),
                    "PYTHONPATH": str(REPO)})
        self.log = open(self.root / "daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "effectd.daemon.main"], env=env,
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        from effectd.client import Client

        deadline = time.monotonic() + 20
        with Client(self.runtime, state=self.state, autostart=False, timeout=0.5, retries=0) as c:
            while True:
                with contextlib.suppress(Exception):
                    if any(w["state"] == "ready" for w in c.hello()["workers"]):
                        return
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"effectd did not start; see {self.root / 'daemon.log'}")
                time.sleep(0.05)

    def client(self) -> Any:
        from effectd.client import Client

        return Client(self.runtime, state=self.state, autostart=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


# ---- the two hand-written executors ---------------------------------------------------------------

class Counter:
    def __init__(self, cli: BabysitterCli) -> None:
        self.cli = cli
        self.iterates = 0
        self.posts = 0

    def iterate(self, run_dir: Path) -> Any:
        self.iterates += 1
        return self.cli.iterate(run_dir)

    def post(self, run_dir: Path, effect: PendingEffect, code: int, out: str, err: str,
             logs: Path) -> None:
        self.posts += 1
        out_path, err_path = logs / f"{effect.effect_id}.out", logs / f"{effect.effect_id}.err"
        out_path.write_text(out)
        err_path.write_text(err)
        value = shell_result_value(code if code >= 0 else None, out, err,
                                   signal=-code if code < 0 else None)
        self.cli.post(run_dir, effect.effect_id, status="ok", value=value,
                      stdout_file=out_path, stderr_file=err_path)


def run_task(effect: PendingEffect) -> tuple[int, str, str]:
    spec = parse_shell_task(effect)
    proc = subprocess.run(shell_argv(spec.command), cwd=spec.cwd, capture_output=True, text=True,
                          env={**os.environ, **(spec.env or {})}, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def serial_executor(cli: BabysitterCli, run_dir: Path, logs: Path) -> dict[str, Any]:
    c = Counter(cli)
    result = c.iterate(run_dir)
    while not result.terminal:
        effect = result.pending[0]
        code, out, err = run_task(effect)
        c.post(run_dir, effect, code, out, err, logs)
        result = c.iterate(run_dir)
    return {"status": result.status, "output": result.output, "iterates": c.iterates, "posts": c.posts}


def parallel_executor(cli: BabysitterCli, run_dir: Path, logs: Path) -> dict[str, Any]:
    c = Counter(cli)
    done: queue.Queue[tuple[PendingEffect, int, str, str]] = queue.Queue()
    started: set[str] = set()

    def work(effect: PendingEffect) -> None:
        done.put((effect, *run_task(effect)))

    result = c.iterate(run_dir)
    while not result.terminal:
        for effect in result.pending:
            if effect.effect_id not in started:
                started.add(effect.effect_id)
                threading.Thread(target=work, args=(effect,), daemon=True).start()
        effect, code, out, err = done.get()
        c.post(run_dir, effect, code, out, err, logs)
        result = c.iterate(run_dir)
    return {"status": result.status, "output": result.output, "iterates": c.iterates, "posts": c.posts}


def drive_executor(cli: BabysitterCli, run_dir: Path, daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as client:
        res = drive(run_dir, babysitter=cli, client=client)
    return {"status": res.status, "output": res.output, "iterates": res.iterations, "posts": res.posts}


def run_executor(name: str, cli: BabysitterCli, run_dir: Path, logs: Path,
                 daemon: Daemon | None) -> dict[str, Any]:
    if name == "serial":
        return serial_executor(cli, run_dir, logs)
    if name == "parallel":
        return parallel_executor(cli, run_dir, logs)
    if name == "drive" and daemon is not None:
        return drive_executor(cli, run_dir, daemon)
    raise SystemExit(f"unknown executor {name!r}")


# ---- main -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def workdir(binary: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bs-bench-"))
    try:
        (root / "node_modules").symlink_to(node_modules_of(binary), target_is_directory=True)
        (root / "processes").mkdir()
        (root / "processes" / "fanout.mjs").write_text(PROCESS)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--babysitter", help="path of the babysitter binary (default: the test install)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per executor (median reported)")
    ap.add_argument("--phase1", default="0,1,2,3", help="phase-1 task durations, seconds")
    ap.add_argument("--phase2", type=int, default=3, help="instant phase-2 tasks")
    ap.add_argument("--only", default="serial,parallel,drive", help="executors to run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    binary = find_sdk_binary(args.babysitter)
    cli = BabysitterCli([str(binary)], timeout=120)
    inputs = {"phase1": [float(x) for x in args.phase1.split(",")], "phase2": args.phase2}
    names = [n for n in args.only.split(",") if n]
    daemon = Daemon() if "drive" in names else None
    times: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, dict[str, int]] = {}
    outputs: dict[str, Any] = {}
    try:
        with workdir(binary) as root:
            for i in range(args.repeat):
                for name in names:
                    run_dir = cli.create_run(root / "processes" / "fanout.mjs",
                                             runs_dir=root / "runs", inputs=inputs,
                                             run_id=f"{name}-{i}")
                    logs = root / "logs" / f"{name}-{i}"
                    logs.mkdir(parents=True)
                    t0 = time.monotonic()
                    res = run_executor(name, cli, run_dir, logs, daemon)
                    times[name].append(time.monotonic() - t0)
                    if res["status"] != "completed":
                        raise SystemExit(f"{name}: run ended {res['status']}")
                    outputs[name] = res["output"]
                    calls[name] = {"iterates": res["iterates"], "posts": res["posts"]}
    finally:
        if daemon is not None:
            daemon.stop()
    if len({json.dumps(o, sort_keys=True) for o in outputs.values()}) != 1:
        raise SystemExit(f"executors disagree: {outputs}")
    med = {n: statistics.median(v) for n, v in times.items()}
    report: dict[str, Any] = {
        "workload": {"phase1_seconds": inputs["phase1"], "phase2_instant": inputs["phase2"]},
        "repeat": args.repeat,
        "seconds": {n: round(v, 3) for n, v in med.items()},
        "all_seconds": {n: [round(x, 3) for x in v] for n, v in times.items()},
        "calls": calls,
    }
    if "drive" in med and "parallel" in med:
        report["drive_over_parallel"] = round(med["drive"] / med["parallel"], 3)
    if "drive" in med and "serial" in med:
        report["drive_over_serial"] = round(med["drive"] / med["serial"], 3)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"two-phase fan-out: phase 1 {inputs['phase1']} s in parallel, then {inputs['phase2']} "
          f"instant tasks; median of {args.repeat}")
    for n in names:
        c = calls[n]
        print(f"  {n:<9} {med[n]:6.2f} s   iterate x{c['iterates']}, post x{c['posts']}")
    for key in ("drive_over_parallel", "drive_over_serial"):
        if key in report:
            print(f"  {key.replace('_', ' ')}: {report[key]:.2f}")


if __name__ == "__main__":
    main()
