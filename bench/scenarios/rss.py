"""10. RSS of the daemon plus its workers: idle (after start and one effect) and under the
bulk-streaming load of scenario 7 (sampled while it streams; re-run here if scenario 7 did not)."""

from __future__ import annotations

import time
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes

MB = 1e6


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("rss", "RSS daemon + workers")
    with BenchDaemon() as d:
        c = d.client()
        c.wait(c.submit_shell(["true"]))
        c.wait(c.submit_python("bench.fx:noop"))
        time.sleep(1.0)  # let the loop settle: idle means idle
        daemon, workers, nworkers = d.rss_bytes()
    idle = (daemon + workers) / MB
    if "stream_rss" not in shared:
        from bench.scenarios import streaming

        streaming.run(sizes, shared)
    load = shared["stream_rss"]
    res.details = {"idle": {"daemon_MB": daemon / MB, "workers_MB": workers / MB, "workers": nworkers},
                   "streaming": {k: (v / MB if k.startswith("max") else v) for k, v in load.items()}}
    res.rows.append(Row(f"idle RSS (daemon + {nworkers} worker)", idle, "MB", target="<= 150 MB", met=idle <= 150))
    res.rows.append(Row("RSS under bulk streaming (max)", load["max_total"] / MB, "MB"))
    return res
