"""The position survives a run killed with SIGKILL at random points: every sequence once."""

import random
import signal
import time
from pathlib import Path

from checker import check_exactly_once
from conftest import start_cli_run
from deltalake import DeltaTable

from nilus_dagster.engine import run_pipeline


def _commits(table: Path) -> int:
    log = table / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


def test_sigkill_at_random_points_loses_and_duplicates_nothing(publisher, stream_pipeline):
    subject, pipeline = stream_pipeline(
        query="&batch_size=500",
        sink_options="commit_max_rows: 500\ncheckpoint_every: 0\ncompact_every: 0\n",
    )
    published = publisher.publish_orders(subject, 40_000)
    table = Path(pipeline.table_location().uri)
    rng = random.Random(7)
    positions = []
    for _ in range(5):
        # The first run's version 0 is the empty table its data then goes into.
        before = max(_commits(table), 1)
        process = start_cli_run(pipeline.path)
        deadline = time.monotonic() + 30
        while _commits(table) <= before and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            time.sleep(0.005)
        # Anywhere between commits, during a write, or between a write and its log entry.
        time.sleep(rng.uniform(0, 0.15))
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        positions.append(DeltaTable(str(table)).transaction_version(pipeline.app_id))
        if positions[-1] == published[-1]:
            break  # on a fast machine a run can finish before its kill: nothing left to cut

    report = run_pipeline(pipeline, drain=True)

    cut = [p for p in positions if p < published[-1]]
    assert len(set(cut)) >= 3, f"kills did not land mid-run: positions {positions}"
    result = check_exactly_once(report.table_uri, published, pipeline.app_id)
    assert result.ok, str(result)
