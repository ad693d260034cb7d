"""End to end: `dagster dev` with its daemon turns published messages into rows.

The sensor (RUNNING by default: run_in_loop is true) sees the pending messages, requests a run,
the queued run coordinator launches it, the run drains into the Delta table, and the event log
holds the run metadata and the sensor's lag observations. Once with the default SQLite storage,
once with a PostgreSQL-backed instance.
"""

import os
import secrets
import time
from collections.abc import Iterator

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster_dev import dagster_dev, wait_for, write_dagster_home
from deltalake import DeltaTable

from nilus_dagster.jetstream.local_server import free_port

DEADLINE_SECONDS = 60
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    try:
        import psycopg2

        admin = psycopg2.connect(dbname="test", connect_timeout=3, **PG)
    except Exception as exc:
        pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({type(exc).__name__}: {exc})")
    admin.autocommit = True
    name = f"nilus_dagster_test_{secrets.token_hex(4)}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; dagster-postgres uses psycopg2.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _row_count(uri: str) -> int:
    try:
        return len(DeltaTable(uri).to_pyarrow_table(columns=["_nats_seq"]))
    except Exception:
        return 0


def _run_dagster_dev(tmp_path, nats_server, publisher, stream_name, write_manifest, storage=""):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    (tmp_path / "pipelines").mkdir()
    write_manifest(
        name="orders",
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}&timeout=1",
        stream=stream_name,
        filename="pipelines/orders.yaml",
        run_mode="per_tick",
    )
    home = write_dagster_home(tmp_path / "dagster_home", storage)
    uri = str(tmp_path / "lakehouse" / "lake" / "analytics" / "orders")
    first = publisher.publish_orders(subject, 50)
    env = {**os.environ, "NILUS_PIPELINES": str(tmp_path / "pipelines")}
    started = time.monotonic()
    with dagster_dev(home, env, tmp_path, free_port()) as log:
        wait_for(lambda: _row_count(uri) == len(first), "the first 50 rows", log, DEADLINE_SECONDS)
        first_ingest = time.monotonic() - started
        second = publisher.publish_orders(subject, 20, start=50)
        wait_for(
            lambda: _row_count(uri) == len(first) + len(second),
            "20 more rows",
            log,
            DEADLINE_SECONDS,
        )
    total = time.monotonic() - started

    seqs = sorted(DeltaTable(uri).to_pyarrow_table()["_nats_seq"].to_pylist())
    assert seqs == first + second
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        key = dg.AssetKey("orders")
        latest = instance.get_latest_materialization_event(key)
        metadata = latest.asset_materialization.metadata
        assert metadata["nats/last_seq"].value == 70
        assert metadata["nats/sequence_lag"].value == 0
        assert metadata["nats/lag_seconds"].value >= 0
        assert metadata["nilus/table_uri"].value == uri
        observations = instance.fetch_observations(key, limit=50).records
        assert observations, "the sensor records the lag on every tick"
        lags = [r.asset_observation.metadata["nats/sequence_lag"].value for r in observations]
        assert any(lag > 0 for lag in lags)  # seen pending before a run took them
        for check in ("sequence_lag_within_bound", "no_gap", "dead_letters"):
            [last] = instance.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(key, check), limit=1
            )
            assert last.status == AssetCheckExecutionRecordStatus.SUCCEEDED, check
            assert last.evaluation.passed, check
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"nilus/pipeline": "orders"}))
        assert runs and all(run.tags["nilus/mode"] == "append" for run in runs)
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    return first_ingest, total


@pytest.mark.slow
def test_dagster_dev_sensor_ingests_published_messages(
    tmp_path, nats_server, publisher, stream_name, write_manifest
):
    first_ingest, total = _run_dagster_dev(
        tmp_path, nats_server, publisher, stream_name, write_manifest
    )
    print(f"sqlite: first rows after {first_ingest:.1f}s, done in {total:.1f}s")


@pytest.mark.slow
def test_dagster_dev_with_a_postgres_instance(
    tmp_path, nats_server, publisher, stream_name, write_manifest, postgres_url
):
    storage = f"storage:\n  postgres:\n    postgres_url: {postgres_url}\n"
    first_ingest, total = _run_dagster_dev(
        tmp_path, nats_server, publisher, stream_name, write_manifest, storage
    )
    print(f"postgres: first rows after {first_ingest:.1f}s, done in {total:.1f}s")
