"""``partition_by`` (v1 ``partition-by``): partition columns, set when a table is created."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from checker import check_exactly_once, order_keys
from conftest import order
from deltalake import DeltaTable

from nilus_dagster.engine import run_pipeline
from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.delta import DeltaSink

APP = "pipeline-orders"
DAY0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def batch(payloads: list[object], start: int) -> MessageBatch:
    data = [p if isinstance(p, bytes) else json.dumps(p).encode() for p in payloads]
    return MessageBatch(
        sequences=list(range(start, start + len(data))),
        timestamps_ns=[
            int((DAY0 + timedelta(seconds=start + i)).timestamp()) * 10**9 for i in range(len(data))
        ],
        subjects=["orders.created"] * len(data),
        payloads=data,
    )


def commit(sink: DeltaSink, b: MessageBatch) -> None:
    prepared = sink.prepare(b)
    sink.commit(prepared.rows, prepared.dead_letters, last_seq=b.last_seq)


def opened(path: Path, **kwargs: object) -> DeltaSink:
    sink = DeltaSink(TableLocation(str(path)), app_id=APP, **kwargs)  # type: ignore[arg-type]
    sink.open()
    return sink


def test_the_table_is_created_partitioned_and_merges_stay_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "orders"
    sink = opened(path, partition_by=["status"], strategy="merge", primary_key=["id"])

    commit(sink, batch([{"id": 1, "status": "paid"}, {"id": 2, "status": "created"}], start=1))
    commit(sink, batch([{"id": 1, "status": "paid", "amount": 3}], start=3))

    table = DeltaTable(str(path))
    assert table.metadata().partition_columns == ["status"]
    folders = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != "_delta_log")
    assert folders == ["status=created", "status=paid"]
    rows = sorted(table.to_pyarrow_table().to_pylist(), key=lambda r: r["id"])
    assert [(r["id"], r["_nats_seq"], r["amount"]) for r in rows] == [(1, 3, 3), (2, 2, None)]
    assert table.transaction_version(APP) == 3


def test_a_partition_column_missing_from_the_first_rows_is_a_clear_error_writing_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "orders"
    sink = opened(path, partition_by=["region", "status"])

    with pytest.raises(SinkError) as caught:
        commit(sink, batch([{"id": 1, "status": "paid"}, b"not json"], start=1))

    message = str(caught.value)
    assert "partition_by names ['region']" in message
    assert "their fields: ['id', 'status']" in message
    assert "fix partition_by under spec.sink.options" in message
    # Neither the table nor its dead letters were started: the next run begins from scratch.
    assert not path.exists() and not (tmp_path / "orders__dead_letters").exists()


def test_a_transform_is_refused_for_a_delta_table(tmp_path: Path) -> None:
    sink = opened(tmp_path / "orders", partition_by=["day(_nats_timestamp)"])

    with pytest.raises(SinkError) as caught:
        commit(sink, batch([{"id": 1}], start=1))

    assert "a Delta table is partitioned by plain columns, not transforms" in str(caught.value)


def test_a_nested_partition_column_is_a_clear_error(tmp_path: Path) -> None:
    sink = opened(tmp_path / "orders", partition_by=["items"])

    with pytest.raises(SinkError) as caught:
        commit(sink, batch([{"id": 1, "items": [{"sku": "a"}]}], start=1))

    assert "partition_by names ['items (list<" in str(caught.value)
    assert "not nested or binary data" in str(caught.value)


def test_an_existing_table_partitioned_otherwise_is_refused_on_open(tmp_path: Path) -> None:
    path = tmp_path / "orders"
    commit(opened(path), batch([{"id": 1, "status": "paid"}], start=1))

    with pytest.raises(SinkError) as caught:
        opened(path, partition_by=["status"])

    assert "partition_by is ['status'], but the table" in str(caught.value)
    assert "exists partitioned by []" in str(caught.value)
    # Without partition_by the table opens as it is.
    assert opened(path).position == 1


def test_nilus_v1_spelling_partition_by_runs_end_to_end(stream_pipeline, publisher) -> None:
    subject, pipeline = stream_pipeline(sink_options="partition-by: [currency, status]\n")
    payloads: list[object] = [order(i) for i in range(30)]
    published = publisher.publish(subject, payloads)

    assert pipeline.manifest.sink.options.partition_by == ("currency", "status")
    report = run_pipeline(pipeline, drain=True)

    uri = pipeline.table_location().uri
    assert report.rows_written == 30
    assert DeltaTable(uri).metadata().partition_columns == ["currency", "status"]
    result = check_exactly_once(
        uri, published, pipeline.app_id, keys=order_keys(published, payloads), key_column="order_id"
    )
    assert result.ok, result


def test_partition_by_is_refused_by_a_sink_that_does_not_partition() -> None:
    from nilus_dagster.manifest.model import SinkOptions
    from nilus_dagster.sink.factory import writer_class

    options = SinkOptions(dest_table="analytics.orders", partition_by="status")
    location = TableLocation("postgresql://x@127.0.0.1/db?table=analytics.orders")

    with pytest.raises(SinkError) as caught:
        writer_class("postgresql").from_options(location, options, app_id=APP)

    assert "the postgresql sink does not partition its tables" in str(caught.value)
