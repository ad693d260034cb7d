"""NATS -> Iceberg through the engine: local and S3 (moto) roots, SQLite and PostgreSQL
catalogs; poison payloads and schema drift, merge, replace, window replacement, SIGKILL at
random points and two concurrent runs, each ending with the checker (pyiceberg scans)."""

import json
import random
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from checker import check_orders
from conftest import order, start_cli_run
from pyiceberg.catalog import load_catalog

from nilus_dagster.engine import run_pipeline
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.sink.iceberg_catalog import catalog_name, catalog_properties

SMALL_COMMITS = "commit_max_rows: 500\n"


def _payloads(start: int, count: int, poison_every: int = 37) -> list[bytes | dict[str, object]]:
    return [
        b"poison %d" % i if i % poison_every == 5 else order(i) for i in range(start, start + count)
    ]


def _table(location: TableLocation, suffix: str = ""):  # type: ignore[no-untyped-def]
    catalog = load_catalog(catalog_name(location), **catalog_properties(location))
    namespace, name = location.table.split(".")
    return catalog.load_table((namespace, name + suffix))


def test_poison_and_drift_into_a_local_root_with_the_embedded_catalog(
    publisher, stream_pipeline, iceberg_depot
):
    depots = iceberg_depot()
    subject, pipeline = stream_pipeline(query="&batch_size=300", sink_options=SMALL_COMMITS)
    location = pipeline.table_location()
    assert location.kind == "iceberg"
    assert location.catalog["uri"] == f"sqlite:///{depots.parent / 'iceberg' / 'catalog.db'}"
    payloads = _payloads(0, 1_500)
    payloads[700] = json.dumps({**order(700), "amount": "twelve"}).encode()  # type drift
    payloads[900] = {**order(900), "coupon": "NEW"}  # a new field
    published = publisher.publish(subject, payloads)

    report = run_pipeline(pipeline, drain=True)
    more = _payloads(1_500, 500)
    published += publisher.publish(subject, more)
    second = run_pipeline(pipeline, drain=True)

    assert (report.position, second.position) == (published[1_499], published[-1])
    assert second.first_seq == published[1_500]
    assert report.table_uri == location.uri and report.row_count == report.rows_written
    result = check_orders(location, published, pipeline.app_id, payloads + more)
    assert result.ok, str(result)
    dead = {
        d["_nats_seq"]: d for d in _table(location, "__dead_letters").scan().to_arrow().to_pylist()
    }
    assert "amount" in dead[published[700]]["error"]
    rows = _table(location).scan(row_filter=f"_nats_seq = {published[900]}").to_arrow()
    assert rows.column("coupon").to_pylist() == ["NEW"]


def test_merge_with_a_postgresql_catalog_keeps_the_latest_message_per_key(
    publisher, stream_pipeline, iceberg_depot, iceberg_pg_catalog_uri
):
    iceberg_depot(catalog={"uri": iceberg_pg_catalog_uri})
    subject, pipeline = stream_pipeline(
        query="&batch_size=200",
        sink_options="incremental_strategy: merge\nprimary_key: order_id\n" + SMALL_COMMITS,
    )
    location = pipeline.table_location()
    first = [order(i) for i in range(1_000)]
    published = publisher.publish(subject, first)
    run_pipeline(pipeline, drain=True)
    result = check_orders(location, published, pipeline.app_id, first)
    assert result.ok, str(result)

    updates = [{**order(i), "status": "refunded"} for i in range(0, 1_000, 10)]
    seqs = publisher.publish(subject, updates)
    report = run_pipeline(pipeline, drain=True)

    rows = _table(location).scan().to_arrow()
    assert rows.num_rows == 1_000 == report.row_count
    by_id = {r["order_id"]: r for r in rows.to_pylist()}
    assert {by_id[u["order_id"]]["status"] for u in updates} == {"refunded"}
    assert sorted(by_id[u["order_id"]]["_nats_seq"] for u in updates) == seqs
    assert report.position == seqs[-1]


def test_replace_and_a_window_backfill_restore_exactly_the_window(
    publisher, stream_pipeline, iceberg_depot
):
    iceberg_depot()
    subject, pipeline = stream_pipeline(query="&batch_size=500", sink_options=SMALL_COMMITS)
    location = pipeline.table_location()
    payloads = _payloads(0, 1_200)
    published = publisher.publish(subject, payloads)
    report = run_pipeline(pipeline, drain=True)
    # Lose rows behind the pipeline's back; the backfill of the day brings them back.
    table = _table(location)
    table.delete(f"_nats_seq < {published[300]}")
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    window = (today - timedelta(days=1), today + timedelta(days=1))
    for _ in range(2):  # twice: the second changes nothing
        backfill = run_pipeline(pipeline, window=window)
        assert backfill.position == report.position
    result = check_orders(location, published, pipeline.app_id, payloads)
    assert result.ok, str(result)

    replace_path = pipeline.path.with_name("replace.yaml")
    replace_path.write_text(
        pipeline.path.read_text().replace(
            "incremental_strategy: append", "incremental_strategy: replace"
        )
    )
    from nilus_dagster.manifest import parse_pipeline

    replacing = parse_pipeline(replace_path)
    newer = _payloads(1_200, 300)
    seqs = publisher.publish(subject, newer)
    run_pipeline(replacing, drain=True)
    left = sorted(_table(location).scan().to_arrow().column("_nats_seq").to_pylist())
    kept = [s for s, p in zip(seqs, newer, strict=True) if not isinstance(p, bytes)]
    assert left == kept


def test_s3_root_on_moto_with_a_postgresql_catalog(
    publisher,
    stream_pipeline,
    iceberg_depot,
    iceberg_pg_catalog_uri,
    s3_server,
    s3_bucket,
    monkeypatch,
    isolated_secrets,
):
    # A placeholder filled at run time registers its value as a secret (redacted everywhere).
    monkeypatch.setenv("S3_SECRET", s3_server.secret_access_key)
    iceberg_depot(
        root=f"s3://{s3_bucket}/iceberg",
        catalog={"uri": iceberg_pg_catalog_uri},
        storage_options={
            "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": "{S3_SECRET}",
            "AWS_REGION": s3_server.region,
            "AWS_ENDPOINT_URL": s3_server.endpoint,
        },
    )
    subject, pipeline = stream_pipeline(query="&batch_size=400", sink_options=SMALL_COMMITS)
    payloads = _payloads(0, 1_200)
    published = publisher.publish(subject, payloads)
    report = run_pipeline(pipeline, drain=True)
    location = pipeline.table_location()
    assert report.table_uri == f"s3://{s3_bucket}/iceberg/analytics/orders"
    result = check_orders(location, published, pipeline.app_id, payloads)
    assert result.ok, str(result)
    assert _table(location).location() == report.table_uri


def _snapshots(folder: Path) -> int:
    return len(list((folder / "metadata").glob("snap-*.avro"))) if folder.exists() else 0


def test_sigkill_at_random_points_loses_and_duplicates_nothing(
    publisher, stream_pipeline, iceberg_depot
):
    iceberg_depot()
    subject, pipeline = stream_pipeline(
        query="&batch_size=500", sink_options="commit_max_rows: 1000\nexpire_every: 0\n"
    )
    location = pipeline.table_location()
    payloads = _payloads(0, 12_000, poison_every=501)
    published = publisher.publish(subject, payloads)
    folder = Path(location.uri)
    rng = random.Random(15)
    kills = 0
    for _ in range(4):
        before = _snapshots(folder)
        process = start_cli_run(pipeline.path)
        deadline = time.monotonic() + 60
        while _snapshots(folder) <= before and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            time.sleep(0.005)
        # Anywhere: writing data files, between the dead letters and the rows, mid-commit.
        time.sleep(rng.uniform(0, 0.3))
        kills += process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    report = run_pipeline(pipeline, drain=True)

    assert kills >= 3, "the runs ended before they were killed; publish more"
    assert report.position == published[-1]
    result = check_orders(location, published, pipeline.app_id, payloads)
    assert result.ok, str(result)


@pytest.mark.parametrize("catalog", ["sqlite", "postgresql"])
def test_two_concurrent_runs_write_every_sequence_once(
    request, publisher, stream_pipeline, iceberg_depot, catalog
):
    if catalog == "postgresql":
        iceberg_depot(catalog={"uri": request.getfixturevalue("iceberg_pg_catalog_uri")})
    else:
        iceberg_depot()
    subject, pipeline = stream_pipeline(
        query="&batch_size=200", sink_options="commit_max_rows: 400\n"
    )
    published: list[int] = []
    payloads: list[bytes | dict[str, object]] = []
    conflicts = 0
    # A loaded machine may start one run late enough to miss the other: repeat until they meet.
    for round_ in range(4):
        batch = _payloads(round_ * 3_000, 3_000)
        published += publisher.publish(subject, batch)
        payloads += batch
        runs = [
            start_cli_run(pipeline.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        for run in runs:
            _, err = run.communicate(timeout=120)
            assert run.returncode == 0, err
            conflicts += err.count("a concurrent commit moved the position")
        if conflicts:
            break
    assert conflicts, "the two runs never overlapped"
    result = check_orders(pipeline.table_location(), published, pipeline.app_id, payloads)
    assert result.ok, str(result)
