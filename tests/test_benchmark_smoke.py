"""The benchmark's one command, small: every path runs and produces every row.

Throughput is not asserted here (a loaded CI machine proves nothing about speed); that each path
received or committed exactly the published messages is.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_every_path_and_each_produces_every_row(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NILUS_", "DAGSTER_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = tmp_path.glob("bench-*.json")
    results = json.loads(result_file.read_text())

    assert results["skipped"] == {}, results["skipped"]
    by_key = {row["key"]: row for row in results["paths"]}
    expected = {"ceiling", "source", "baseline", "engine", "cli", "dagster"}
    expected |= {"pg-cli", "pg-ceiling", "pg-peer"}  # NATS -> PostgreSQL, its ceiling, dlt
    expected |= {"cli-iceberg"}  # NATS -> Iceberg, beside cli (Delta)
    assert set(by_key) == expected
    for key, row in by_key.items():
        assert row["error"] is None, (key, row["error"])
        assert row["rows_ok"], key
        assert row["messages"] == row["expected"] == results["settings"]["messages"], key
        assert row["msg_per_s"] > 0 and row["peak_rss_mb"] > 0, key
    latency = results["latency"]
    assert latency["rows_ok"], latency
    assert latency["rows"] > 0 and 0 < latency["p50"] <= latency["p99"]
    assert "| engine: run_pipeline (in-process) |" in proc.stdout
