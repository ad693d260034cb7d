"""`dagster asset materialize --partition-range` on definitions.py: a backfill, twice, same rows."""

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from deltalake import DeltaTable

from nilus_dagster.engine import run_pipeline
from nilus_dagster.manifest import parse_pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MATERIALIZE = [
    sys.executable,
    "-m",
    "dagster",
    "asset",
    "materialize",
    "-f",
    str(REPO / "definitions.py"),
]


def _materialize(env, cwd, *args):
    return subprocess.run(
        [*MATERIALIZE, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _table(uri):
    return DeltaTable(uri).to_pyarrow_table().sort_by("_nats_seq")


def test_partition_range_backfill_from_the_cli_twice_gives_the_same_rows(
    tmp_path, nats_server, publisher, stream_name, write_manifest
):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    seqs = publisher.publish_orders(subject, 120)
    (tmp_path / "pipelines").mkdir()
    path = write_manifest(
        name="orders-cli",
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}",
        stream=stream_name,
        filename="pipelines/orders-cli.yaml",
    )
    uri = run_pipeline(parse_pipeline(path)).table_uri  # the committed position: 120
    DeltaTable(uri).delete("_nats_seq <= 20")  # lose rows the backfill must bring back
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "NILUS_PIPELINES": str(tmp_path / "pipelines"), "DAGSTER_HOME": str(home)}
    today = datetime.now(timezone.utc).date()
    window = f"{today - timedelta(days=2)}...{today}"

    first = _materialize(env, tmp_path, "--select", "orders-cli", "--partition-range", window)
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = _table(uri)
    second = _materialize(env, tmp_path, "--select", "orders-cli", "--partition-range", window)
    assert second.returncode == 0, second.stderr[-3000:]
    after_second = _table(uri)

    assert after_first["_nats_seq"].to_pylist() == seqs
    assert after_second.equals(after_first)
    assert "RUN_SUCCESS" in second.stderr
