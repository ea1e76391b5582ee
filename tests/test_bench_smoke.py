"""The benchmark runs end to end at tiny sizes and reports a numeric figure for every scenario.

No timing thresholds: this only proves ``python -m bench`` works (its own daemons start and stop,
every scenario produces figures, the JSON is complete). Peers (Huey, Ray) may be skipped when they
are not installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ["submit_ack", "python_e2e", "throughput", "sleep_parallel", "cli_run", "cli_status",
             "streaming", "line_latency", "submitters", "rss", "peer_huey", "peer_ray"]
PEERS = {"peer_huey", "peer_ray"}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_tiny_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=170)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["mode"] == "tiny"
    assert set(SCENARIOS) <= set(doc["scenarios"]), sorted(doc["scenarios"])
    for key in SCENARIOS:
        sc = doc["scenarios"][key]
        if key in PEERS and (sc["skipped"] or sc["error"]):
            continue
        assert sc["error"] is None, f"{key}: {sc['error']}\n{sc['details'].get('traceback', '')}"
        assert sc["rows"], f"{key} reported no figures"
        for row in sc["rows"]:
            assert isinstance(row["figure"], (int, float)) and math.isfinite(row["figure"]), (key, row)
            if row["baseline"] is not None:
                assert isinstance(row["baseline"], (int, float)) and math.isfinite(row["baseline"]), (key, row)
    # The printed table names every scenario that ran.
    for key in SCENARIOS:
        assert key in proc.stdout
