"""1. submit -> durable ack: ``Client.submit_sleep(0)`` round trip.

Baseline, measured in the same run: a raw pyzmq REQ/REP round trip over ipc between two processes
plus one ``os.fsync`` of a small file (the two things a durable ack cannot avoid).

Diagnostics (to say where the time goes): ``hello`` is the control round trip without a journal
write; a submit whose effect stays queued (``after`` a running 1-hour sleep) is the submit path
without the effect's own start/finish commits competing with the next submit. fsyncs are counted
in a second, separate pass with the daemon under strace (which slows it a little, so no latency
is taken from that pass)."""

from __future__ import annotations

import shutil
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper, summary, timed
from effectd.client import sleep_spec

TITLE = "submit -> durable ack (submit_sleep(0))"


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("submit_ack", TITLE)
    strace = shutil.which("strace") is not None
    diag_n = min(sizes.submit_n, 300)
    with BenchDaemon() as d:
        c = d.client()
        lat = timed(lambda: c.submit_sleep(0), sizes.submit_n, warmup=min(100, sizes.submit_n))
        hello = summary(timed(c.hello, diag_n, warmup=10))
        blocker = c.submit_sleep(3600)
        queued_spec = sleep_spec(0, after=[blocker])
        queued = summary(timed(lambda: c.submit(queued_spec), diag_n))
        c.cancel(blocker)  # its dependents are cancelled too; the daemon then stops at once
    syncs = queued_syncs = None
    if strace:
        with BenchDaemon(strace_syncs=True) as d:
            c = d.client()
            for _ in range(50):
                c.submit_sleep(0)
            s0 = d.sync_calls()
            for _ in range(diag_n):
                c.submit_sleep(0)
            syncs = (d.sync_calls() - s0) / diag_n
            blocker = c.submit_sleep(3600)
            queued_spec = sleep_spec(0, after=[blocker])
            s0 = d.sync_calls()
            for _ in range(diag_n):
                c.submit(queued_spec)
            queued_syncs = (d.sync_calls() - s0) / diag_n
            c.cancel(blocker)
    eff = summary(lat)
    rr = run_helper("bench.baselines:reqrep", sizes.submit_n)
    fs = run_helper("bench.baselines:fsync_small", sizes.submit_n)
    base_p50 = rr["p50"] + fs["p50"]
    base_p99 = rr["p99"] + fs["p99"]
    res.details = {"effectd_ms": eff, "reqrep_ms": rr, "fsync_ms": fs, "hello_ms": hello,
                   "queued_submit_ms": queued, "daemon_syncs_per_submit": syncs,
                   "daemon_syncs_per_queued_submit": queued_syncs}
    res.rows.append(Row("submit ack p50", eff["p50"], "ms", base_p50, "REQ/REP ipc + fsync",
                        "<= 2x baseline", eff["p50"] <= 2 * base_p50, p99=eff["p99"], baseline_p99=base_p99))
    res.rows.append(Row("  component: REQ/REP ipc rt p50", rr["p50"], "ms", p99=rr["p99"]))
    res.rows.append(Row("  component: fsync small file p50", fs["p50"], "ms", p99=fs["p99"]))
    res.rows.append(Row("  diag: hello round trip (no journal write)", hello["p50"], "ms", rr["p50"],
                        "REQ/REP ipc", p99=hello["p99"]))
    res.rows.append(Row("  diag: submit that stays queued", queued["p50"], "ms", base_p50, "REQ/REP ipc + fsync",
                        p99=queued["p99"]))
    if syncs is not None:
        res.rows.append(Row("  diag: daemon fsyncs per submit_sleep(0)", syncs, "sync"))
        res.rows.append(Row("  diag: daemon fsyncs per queued submit", queued_syncs, "sync"))
    return res
