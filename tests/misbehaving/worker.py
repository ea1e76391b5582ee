"""A stand-in for the effectd worker, used by tests/test_proctree.py.

It makes itself a child subreaper, starts effects the way the real worker does
(new session + EFFECTD_EFFECT_ID in the environment) and runs proctree
operations on request.  Protocol: one JSON object per line on stdin, one JSON
reply per line on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil

from effectd.daemon import proctree as pt
from tests import proctools  # the repo root is on PYTHONPATH (tests/test_proctree.py child_env)

popens: dict[int, subprocess.Popen[bytes]] = {}


def protected() -> set[int]:
    """Pids whose exit status we still want from their Popen objects."""
    return {pid for pid, p in popens.items() if p.returncode is None}


def ident(raw: list[Any] | None) -> pt.ProcessIdentity | None:
    return None if raw is None else pt.ProcessIdentity(int(raw[0]), float(raw[1]))


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    if op == "spawn":
        env = dict(os.environ, **{pt.EFFECT_MARKER_ENV: req["effect"]})
        p = subprocess.Popen(
            req["argv"],
            start_new_session=True,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        popens[p.pid] = p
        i = proctools.identity_of(p.pid)
        assert i is not None
        return {"root": [i.pid, i.create_time]}
    if op == "kill":
        tk = pt.TreeKill(req["effect"], ident(req.get("root")), req["grace"])
        t0 = time.monotonic()
        tk.start()
        start_s = time.monotonic() - t0
        max_poll = 0.0
        polls_before_deadline: list[bool] = []
        while True:
            a = time.monotonic()
            done = tk.poll(a)
            max_poll = max(max_poll, time.monotonic() - a)
            assert tk.deadline is not None
            if a < tk.deadline:
                polls_before_deadline.append(done)
            if done or time.monotonic() - t0 > req.get("timeout", 10.0):
                break
            proctools.wait_any([p.pid for p in tk.survivors], 0.05)
        # Once the kill is done every process of the tree is a zombie (or gone, and orphans
        # were re-parented to us before their parents died): collect ours, as the real worker does.
        pt.reap_orphan_zombies(protected())
        return {
            "done": done,
            "elapsed": time.monotonic() - t0,
            "start_s": start_s,
            "max_poll": max_poll,
            "killed": tk.killed,
            "seen": [[i.pid, i.create_time] for i in tk.seen],
            "polls_before_deadline": polls_before_deadline,
        }
    if op == "kill_tree":
        t0 = time.monotonic()
        ok = proctools.kill_tree(
            req["effect"],
            ident(req.get("root")),
            req["grace"],
            req.get("timeout", 10.0),
        )
        pt.reap_orphan_zombies(protected())  # as the real worker does: a kill itself never reaps
        return {"done": ok, "elapsed": time.monotonic() - t0}
    if op == "wait":
        p = popens[req["pid"]]
        return {"returncode": p.wait(timeout=req.get("timeout", 5.0))}
    if op == "poll":
        return {"returncode": popens[req["pid"]].poll()}
    if op == "children":
        out = []
        for c in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                out.append([c.pid, c.status()])
        return {"children": out}
    if op == "reap":
        return {"reaped": pt.reap_orphan_zombies(set(req.get("protected", protected())))}
    if op == "procs":
        found = pt.effect_processes(req["effect"], ident(req.get("root")))
        return {"pids": [p.pid for p in found]}
    if op == "info":
        return {"pid": os.getpid(), "subreaper": proctools.is_subreaper()}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    ok = pt.become_subreaper()
    print(json.dumps({"ready": True, "subreaper": ok, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        try:
            reply = handle(req)
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
