"""The PostgreSQL table's row count in run metadata: counted while the table is small,
PostgreSQL's estimate once a count would scan a large table at every run and report."""

import json

import pytest

import nilus_dagster.sink.postgres as postgres_sink
from nilus_dagster.engine import run_pipeline
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.postgres import PostgresSink
from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_facts import count_rows

CREATED = "2025-01-01T00:00:00+00:00"


def _write(sink: PostgresSink, start: int, count: int) -> None:
    payloads = [
        json.dumps({"id": i, "note": "x" * 40}).encode() for i in range(start, start + count)
    ]
    batch = MessageBatch(
        list(range(start, start + count)),
        [1_740_000_000_000_000_000 + i for i in range(count)],
        ["orders.new"] * count,
        payloads,
    )
    decoded = sink.prepare(batch)
    sink.commit(
        decoded.rows,
        decoded.dead_letters,
        last_seq=batch.last_seq,
        commit_metadata={"nilus.stream_created": CREATED},
    )


def test_a_small_table_is_counted_and_a_large_one_estimated(postgres_database, monkeypatch):
    db = postgres_database
    sink = PostgresSink(db.location(), app_id="nilus-dagster/orders")
    sink.open()
    assert sink.counted_rows() == (0, False)  # no table yet
    _write(sink, 1, 3_000)
    assert sink.counted_rows() == (3_000, False)  # never analyzed: PostgreSQL has no estimate

    db.query("ANALYZE analytics.orders")
    assert sink.counted_rows() == (3_000, False)  # estimated, but within the limit: counted
    monkeypatch.setattr(postgres_sink, "EXACT_COUNT_ROWS", 1_000)
    assert sink.counted_rows() == (3_000, True)  # ANALYZE read every page: exact here
    _write(sink, 3_001, 3_000)
    rows, estimated = sink.counted_rows()  # rows per page as analyzed, times the pages now
    assert estimated and 5_400 <= rows <= 6_600
    assert sink.row_count() == 6_000  # the exact count is still there for who asks for it
    sink.close()


def test_count_rows_counts_a_table_postgresql_never_analyzed_however_low_the_limit(
    postgres_database,
):
    db = postgres_database
    # Autovacuum off: it would analyze the table sooner or later.
    db.query("CREATE TABLE t WITH (autovacuum_enabled = off) AS SELECT generate_series(1, 500) g")
    conn = PostgresConnection(db.url)
    try:
        assert count_rows(conn, "public", "t", exact_up_to=10) == (500, False)
        assert count_rows(conn, "public", "t", exact_up_to=None) == (500, False)
    finally:
        conn.close()


def test_run_metadata_says_when_the_row_count_is_an_estimate(
    postgres_database, publisher, stream_pipeline, monkeypatch
):
    db = postgres_database
    address = f"postgresql://{db.user}@{db.host}:{db.port}/{db.name}"
    subject, pipeline = stream_pipeline(sink_address=address)
    publisher.publish_orders(subject, 300)
    first = run_pipeline(pipeline, drain=True)
    assert first.metadata()["dagster/row_count"] == 300
    assert "nilus/row_count_estimated" not in first.metadata()

    db.query("ANALYZE analytics.orders")
    monkeypatch.setattr(postgres_sink, "EXACT_COUNT_ROWS", 100)
    publisher.publish_orders(subject, 20, start=300)
    second = run_pipeline(pipeline, drain=True)

    assert second.rows_written == 20
    assert second.metadata()["nilus/row_count_estimated"] is True
    assert 250 <= second.metadata()["dagster/row_count"] <= 400


def test_a_partitioned_table_is_counted_and_a_missing_one_is_postgresqls_error(
    postgres_database,
):
    db = postgres_database
    db.query("CREATE TABLE p (g int) PARTITION BY RANGE (g)")
    db.query("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10000)")
    db.query("INSERT INTO p SELECT generate_series(1, 4000)")
    db.query("ANALYZE p")  # a parent's relpages is -1 then: no estimate of its own
    conn = PostgresConnection(db.url)
    try:
        assert count_rows(conn, "public", "p", exact_up_to=10) == (4_000, False)
        conn.rollback()
        with pytest.raises(Exception, match="does not exist"):
            count_rows(conn, "public", "gone", exact_up_to=10)
    finally:
        conn.close()


def test_a_user_who_may_only_insert_gets_the_estimate_or_no_row_count(
    postgres_database, publisher, stream_pipeline
):
    # append needs INSERT only: the row count must not fail a run after its commit.
    db = postgres_database
    address = f"postgresql://{db.user}@{db.host}:{db.port}/{db.name}"
    subject, pipeline = stream_pipeline(sink_address=address)
    publisher.publish_orders(subject, 50)
    run_pipeline(pipeline, drain=True)  # creates the tables as the owner
    db.query("ALTER TABLE analytics.orders SET (autovacuum_enabled = off)")
    role = db.role(
        "GRANT USAGE ON SCHEMA analytics TO {role}",
        "GRANT SELECT, INSERT, UPDATE ON analytics.nilus_positions TO {role}",
        "GRANT INSERT ON analytics.orders TO {role}",
    )
    as_role = f"postgresql://{role}@{db.host}:{db.port}/{db.name}"
    _, writer = stream_pipeline(sink_address=as_role)

    publisher.publish_orders(subject, 10, start=50)
    unknown = run_pipeline(writer, drain=True)
    db.query("ANALYZE analytics.orders")
    publisher.publish_orders(subject, 10, start=60)
    estimated = run_pipeline(writer, drain=True)

    assert unknown.rows_written == 10 and unknown.row_count is None
    assert "dagster/row_count" not in unknown.metadata()
    assert estimated.rows_written == 10 and estimated.row_count_estimated
    assert 50 <= estimated.metadata()["dagster/row_count"] <= 80
    assert db.query("SELECT count(*) FROM analytics.orders") == [(70,)]
