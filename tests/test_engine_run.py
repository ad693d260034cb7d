"""The engine against a real nats-server and real Delta tables: strategies, limits, positions."""

import json
import threading

import pytest
from checker import check_exactly_once
from deltalake import DeltaTable

from nilus_dagster.engine import measure_lag, run_pipeline
from nilus_dagster.errors import PositionError, SinkError
from nilus_dagster.manifest import parse_pipeline


@pytest.fixture
def orders_stream(publisher, stream_name):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    return stream_name, subject


def _pipeline(write_manifest, nats_server, stream, subject, **kwargs):
    query = kwargs.pop("query", "")
    address = f"nats+jetstream://{nats_server.hostport}?subject={subject}&batch_size=50{query}"
    return parse_pipeline(write_manifest(address=address, stream=stream, **kwargs))


def _rows(uri):
    return DeltaTable(uri).to_pyarrow_table().sort_by("_nats_seq").to_pylist()


def test_drain_commits_every_message_once_with_metadata_columns(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    seqs = publisher.publish_orders(subject, 1_000)
    publisher.publish(f"{stream}.other", [{"noise": 1}] * 5)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)

    report = run_pipeline(pipeline)

    assert report.messages == 1_000
    assert (report.first_seq, report.last_seq) == (1, 1_000)
    assert report.position == 1_000
    assert report.stream_last_seq == 1_005
    assert report.sequence_lag == 0
    assert report.row_count == 1_000
    assert report.gap == 0
    rows = _rows(report.table_uri)
    assert [r["_nats_seq"] for r in rows] == seqs
    assert rows[0]["_nats_subject"] == subject
    assert rows[0]["order_id"] == "ord-000000000"
    assert rows[0]["items"] == [{"sku": "sku-0000", "qty": 1}]
    assert rows[0]["_nats_headers"] is None
    assert rows[0]["_nats_timestamp"].tzinfo is not None
    assert check_exactly_once(report.table_uri, seqs, pipeline.app_id).ok


def test_second_run_resumes_after_the_committed_position(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    first = publisher.publish_orders(subject, 300)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)
    run_pipeline(pipeline)
    second = publisher.publish_orders(subject, 200, start=300)

    report = run_pipeline(pipeline)
    again = run_pipeline(pipeline)

    assert (report.first_seq, report.last_seq, report.messages) == (301, 500, 200)
    assert again.messages == 0 and again.position == 500
    # Nothing new: the empty range after the position, not a 0 on the asset's plots.
    assert (again.metadata()["nats/first_seq"], again.metadata()["nats/last_seq"]) == (501, 500)
    assert check_exactly_once(report.table_uri, first + second, pipeline.app_id).ok


def test_run_in_loop_false_pulls_one_batch(nats_server, publisher, orders_stream, write_manifest):
    stream, subject = orders_stream
    publisher.publish_orders(subject, 120)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject, run_in_loop=False)

    report = run_pipeline(pipeline)

    assert report.messages == 50  # batch_size
    assert report.sequence_lag == 70


def test_max_messages_and_small_commits(nats_server, publisher, orders_stream, write_manifest):
    stream, subject = orders_stream
    seqs = publisher.publish_orders(subject, 500)
    pipeline = _pipeline(
        write_manifest, nats_server, stream, subject, extra_sink_options="commit_max_rows: 100\n"
    )

    partial = run_pipeline(pipeline, max_messages=250)
    rest = run_pipeline(pipeline)

    assert partial.messages == 250 and partial.position == 250
    assert rest.messages == 250 and rest.commits == 3  # 100 + 100 + 50 rows
    assert check_exactly_once(rest.table_uri, seqs, pipeline.app_id).ok


def test_commits_are_bounded_by_payload_bytes(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    payloads = [json.dumps({"i": i, "pad": "x" * (82 - len(str(i)))}).encode() for i in range(300)]
    assert {len(p) for p in payloads} == {100}
    seqs = publisher.publish(subject, payloads)
    pipeline = _pipeline(
        write_manifest,
        nats_server,
        stream,
        subject,
        extra_sink_options="commit_max_rows: 1000\ncommit_max_bytes: 1050\n",
    )

    report = run_pipeline(pipeline)

    assert report.messages == 300 and report.commits == 30  # 10 payloads of 100 bytes each
    assert check_exactly_once(report.table_uri, seqs, pipeline.app_id).ok


def test_poison_payloads_go_to_dead_letters_without_stopping(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    payloads = [
        {"order_id": "a", "amount": 1.5},
        b"not json",
        {"order_id": "b", "amount": 2.5},
        b"[1, 2, 3]",
        b"",
        b"\xff\xfe\x00",
        {"order_id": "c", "amount": 3.5},
    ]
    seqs = publisher.publish(subject, payloads)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)

    report = run_pipeline(pipeline)

    assert report.rows_written == 3 and report.dead_letters == 4
    dead = DeltaTable(report.table_uri + "__dead_letters").to_pyarrow_table().to_pylist()
    assert sorted(d["_nats_seq"] for d in dead) == [seqs[1], seqs[3], seqs[4], seqs[5]]
    assert {bytes(d["_nats_data"]) for d in dead} == {
        b"not json",
        b"[1, 2, 3]",
        b"",
        b"\xff\xfe\x00",
    }
    assert all(d["error"] for d in dead)
    assert check_exactly_once(report.table_uri, seqs, pipeline.app_id).ok


def test_new_fields_add_columns(nats_server, publisher, orders_stream, write_manifest):
    stream, subject = orders_stream
    publisher.publish(subject, [{"id": 1}])
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)
    run_pipeline(pipeline)
    publisher.publish(subject, [{"id": 2, "coupon": "X1"}])

    report = run_pipeline(pipeline)

    rows = _rows(report.table_uri)
    assert [(r["id"], r["coupon"]) for r in rows] == [(1, None), (2, "X1")]


def test_merge_keeps_the_latest_sequence_per_key(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    publisher.publish(
        subject,
        [{"k": "a", "v": 1}, {"k": "b", "v": 1}, {"k": "a", "v": 2}],
    )
    pipeline = _pipeline(
        write_manifest,
        nats_server,
        stream,
        subject,
        strategy="merge",
        extra_sink_options="primary_key: k\n",
    )
    run_pipeline(pipeline)
    publisher.publish(subject, [{"k": "b", "v": 3}])

    report = run_pipeline(pipeline)

    rows = {r["k"]: (r["v"], r["_nats_seq"]) for r in _rows(report.table_uri)}
    assert rows == {"a": (2, 3), "b": (3, 4)}
    assert report.row_count == 2


def test_replace_overwrites_with_the_runs_rows(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    publisher.publish_orders(subject, 10)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject, strategy="replace")
    run_pipeline(pipeline)
    publisher.publish_orders(subject, 4, start=10)

    report = run_pipeline(pipeline)

    assert [r["_nats_seq"] for r in _rows(report.table_uri)] == [11, 12, 13, 14]
    assert report.position == 14


def test_create_table_false_and_missing_table_is_a_clear_error(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    publisher.publish_orders(subject, 3)
    pipeline = _pipeline(
        write_manifest, nats_server, stream, subject, extra_sink_options="create_table: false\n"
    )

    with pytest.raises(SinkError, match="create_table"):
        run_pipeline(pipeline)


def test_raw_format_keeps_payload_bytes(nats_server, publisher, orders_stream, write_manifest):
    stream, subject = orders_stream
    publisher.publish(subject, [b"\x00\x01binary", b"{}"], headers={"trace": "t1"})
    pipeline = _pipeline(write_manifest, nats_server, stream, subject, query="&format=raw")

    report = run_pipeline(pipeline)

    rows = _rows(report.table_uri)
    assert [bytes(r["_nats_data"]) for r in rows] == [b"\x00\x01binary", b"{}"]
    assert dict(rows[0]["_nats_headers"]) == {"trace": "t1"}


def test_start_sequence_applies_to_the_first_run_only(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    publisher.publish_orders(subject, 20)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject, query="&start_sequence=15")

    report = run_pipeline(pipeline)

    assert (report.first_seq, report.last_seq) == (15, 20)


def test_purge_past_the_position_is_a_reported_gap(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    publisher.publish_orders(subject, 10)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)
    run_pipeline(pipeline)
    publisher.publish_orders(subject, 10, start=10)
    publisher.purge(stream, seq=16)  # removes 11..15

    assert measure_lag(pipeline).gap == 5
    report = run_pipeline(pipeline)

    assert report.gap == 5
    assert (report.first_seq, report.last_seq) == (16, 20)
    assert check_exactly_once(report.table_uri, [*range(1, 11), *range(16, 21)], pipeline.app_id).ok


def test_recreated_stream_is_a_clear_error(nats_server, publisher, orders_stream, write_manifest):
    stream, subject = orders_stream
    publisher.publish_orders(subject, 5)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)
    run_pipeline(pipeline)
    publisher.delete_stream(stream)
    publisher.create_stream(stream, [f"{stream}.>"])
    publisher.publish_orders(subject, 8)

    with pytest.raises(PositionError, match="recreated"):
        run_pipeline(pipeline)
    assert measure_lag(pipeline).problem


def test_lag_reports_pending_messages_on_the_subject_only(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    publisher.publish_orders(subject, 30)
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)
    run_pipeline(pipeline, max_messages=10)
    publisher.publish(f"{stream}.other", [{"x": 1}] * 7)

    lag = measure_lag(pipeline)

    assert (lag.position, lag.sequence_lag, lag.stream_last_seq) == (10, 20, 37)
    assert lag.lag_seconds is not None and lag.lag_seconds >= 0


def test_concurrent_runs_never_duplicate_rows(
    nats_server, publisher, orders_stream, write_manifest
):
    stream, subject = orders_stream
    seqs = publisher.publish_orders(subject, 3_000)
    pipeline = _pipeline(
        write_manifest, nats_server, stream, subject, extra_sink_options="commit_max_rows: 200\n"
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_pipeline(pipeline)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert not errors
    result = check_exactly_once(
        DeltaTable(pipeline.table_location().uri).table_uri, seqs, pipeline.app_id
    )
    assert result.ok, str(result)


def test_json_payload_with_headers(nats_server, publisher, orders_stream, write_manifest):
    stream, subject = orders_stream
    publisher.publish(subject, [json.dumps({"id": 1}).encode()], headers={"k": "v"})
    pipeline = _pipeline(write_manifest, nats_server, stream, subject)

    report = run_pipeline(pipeline)

    assert dict(_rows(report.table_uri)[0]["_nats_headers"]) == {"k": "v"}
