"""The PostgreSQL sink writer against the machine's PostgreSQL, each test in a fresh database."""

import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from nilus_dagster.errors import SinkError
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import PositionConflict, sink_writer
from nilus_dagster.sink.postgres import PostgresSink
from nilus_dagster.sink.postgres_catalog import ensure_positions_table, ensure_schema
from nilus_dagster.sink.postgres_connection import PostgresConnection

APP = "nilus-dagster/orders"
CREATED = "2025-01-01T00:00:00+00:00"
T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)


def batch(start: int, payloads: list[object], *, minutes: int = 0) -> MessageBatch:
    """Messages ``start, start+1, ...``, one minute apart from ``T0 + minutes``."""
    n = len(payloads)
    base = int((T0 + timedelta(minutes=minutes)).timestamp() * 1e9)
    return MessageBatch(
        sequences=list(range(start, start + n)),
        timestamps_ns=[base + i * 60_000_000_000 for i in range(n)],
        subjects=["orders.new"] * n,
        payloads=[p if isinstance(p, bytes) else json.dumps(p).encode() for p in payloads],
    )


def write(sink: PostgresSink, b: MessageBatch, **kwargs: object):  # type: ignore[no-untyped-def]
    decoded = sink.prepare(b, format=kwargs.pop("format", "json"))  # type: ignore[arg-type]
    return sink.commit(
        decoded.rows,
        decoded.dead_letters,
        last_seq=b.last_seq,
        commit_metadata={"nilus.stream_created": CREATED},
        **kwargs,  # type: ignore[arg-type]
    )


def opened(location, **kwargs: object) -> PostgresSink:  # type: ignore[no-untyped-def]
    sink = PostgresSink(location, app_id=APP, **kwargs)  # type: ignore[arg-type]
    sink.open()
    return sink


def test_append_writes_rows_types_and_the_position_in_one_commit(postgres_database) -> None:
    db = postgres_database
    sink = opened(db.location())
    assert sink.position == 0 and sink.schema() is None
    orders = [
        {"id": i, "amount": 1.5 * i, "paid": i % 2 == 0, "note": f"n{i}", "items": [{"sku": "a"}]}
        for i in range(1, 4)
    ]
    result = write(sink, batch(1, orders))
    assert (result.rows_written, result.dead_letters, result.position) == (3, 0, 3)

    types = dict(
        db.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'analytics' AND table_name = 'orders'"
        )
    )
    assert types == {
        "id": "bigint",
        "amount": "double precision",
        "paid": "boolean",
        "note": "text",
        "items": "jsonb",
        "_nats_subject": "text",
        "_nats_seq": "bigint",
        "_nats_timestamp": "timestamp with time zone",
        "_nats_headers": "jsonb",
    }
    rows = db.query(
        "SELECT id, amount, paid, items, _nats_seq, _nats_timestamp FROM analytics.orders "
        "ORDER BY id"
    )
    assert rows[0] == (1, 1.5, False, [{"sku": "a"}], 1, T0)
    assert db.query(
        "SELECT pipeline, table_name, last_seq, stream_created FROM analytics.nilus_positions"
    ) == [(APP, "orders", 3, CREATED)]

    again = opened(db.location())
    state_rows = again.row_count()
    assert (again.position, again.newest_timestamp(), state_rows) == (
        3,
        T0 + timedelta(minutes=2),
        3,
    )
    assert again.open().stream_created == CREATED


def test_headers_and_raw_payloads(postgres_database) -> None:
    db = postgres_database
    sink = opened(db.location())
    b = batch(1, [b"\x00\x01binary", b"{}"])
    b.headers = [{"Nats-Msg-Id": "a"}, None]
    write(sink, b, format="raw")
    rows = db.query("SELECT _nats_data, _nats_headers FROM analytics.orders ORDER BY _nats_seq")
    assert rows == [(b"\x00\x01binary", {"Nats-Msg-Id": "a"}), (b"{}", None)]
    kinds = dict(
        db.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'orders' AND column_name = '_nats_data'"
        )
    )
    assert kinds == {"_nats_data": "bytea"}


def test_new_field_adds_a_column_and_a_conflicting_type_is_a_dead_letter(
    postgres_database,
) -> None:
    db = postgres_database
    sink = opened(db.location())
    write(sink, batch(1, [{"id": 1, "amount": 2.0}]))
    result = write(
        sink, batch(2, [{"id": 2, "amount": "lots"}, {"id": 3, "coupon": "X"}, b"not json"])
    )
    assert (result.rows_written, result.dead_letters) == (1, 2)
    assert db.query("SELECT id, coupon FROM analytics.orders ORDER BY id") == [
        (1, None),
        (3, "X"),
    ]
    dead = db.query(
        "SELECT _nats_seq, _nats_data, error FROM analytics.orders__dead_letters ORDER BY 1"
    )
    assert [(seq, data) for seq, data, _ in dead] == [
        (2, b'{"id": 2, "amount": "lots"}'),
        (4, b"not json"),
    ]
    assert "amount" in dead[0][2] and "JSON" in dead[1][2]


def test_a_jsonb_column_takes_values_of_any_shape_from_later_batches(postgres_database) -> None:
    db = postgres_database
    sink = opened(db.location())
    write(sink, batch(1, [{"id": 1, "meta": {"a": [1, 2]}}]))
    write(sink, batch(2, [{"id": 2, "meta": {"b": 'x"y'}}]))
    write(sink, batch(3, [{"id": 3, "meta": [True, None]}]))
    rows = db.query("SELECT id, meta FROM analytics.orders ORDER BY id")
    assert rows == [(1, {"a": [1, 2]}), (2, {"b": 'x"y'}), (3, [True, None])]


def test_merge_replaces_a_row_only_with_a_higher_sequence(postgres_database) -> None:
    db = postgres_database
    sink = opened(db.location(), strategy="merge", primary_key=["id"])
    write(sink, batch(1, [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 1, "v": "c"}]))
    write(sink, batch(4, [{"id": 2, "v": "d"}, {"id": 3, "v": "e"}]))
    assert db.query("SELECT id, v, _nats_seq FROM analytics.orders ORDER BY id") == [
        (1, "c", 3),
        (2, "d", 4),
        (3, "e", 5),
    ]
    # A backfill replays older messages: they never roll a row back.
    old = sink.prepare(batch(1, [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]))
    sink.replace_window(old.rows, None, start=T0, end=T0 + timedelta(days=1))
    assert db.query("SELECT v FROM analytics.orders ORDER BY id") == [("c",), ("d",), ("e",)]


def test_merge_without_the_key_field_is_a_dead_letter(postgres_database) -> None:
    sink = opened(postgres_database.location(), strategy="merge", primary_key=["id"])
    result = write(sink, batch(1, [{"id": 1}, {"other": 2}]))
    assert (result.rows_written, result.dead_letters) == (1, 1)


def test_replace_empties_and_refills_in_one_transaction(postgres_database) -> None:
    db = postgres_database
    sink = opened(db.location(), strategy="replace")
    write(sink, batch(1, [{"id": 1}, {"id": 2}]), overwrite=True)
    # A write that fails after the TRUNCATE rolls the TRUNCATE back with it.
    db.query(
        "CREATE FUNCTION analytics.refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.id = 13 THEN RAISE EXCEPTION 'refused 13'; END IF; RETURN NEW; END $$"
    )
    db.query(
        "CREATE TRIGGER refuse BEFORE INSERT ON analytics.orders "
        "FOR EACH ROW EXECUTE FUNCTION analytics.refuse()"
    )
    with pytest.raises(SinkError, match="refused 13"):
        write(sink, batch(3, [{"id": 12}, {"id": 13}]), overwrite=True)
    assert db.query("SELECT id FROM analytics.orders ORDER BY id") == [(1,), (2,)]
    assert sink.position == 2
    db.query("DROP TRIGGER refuse ON analytics.orders")
    write(sink, batch(3, [{"id": 12}]), overwrite=True)
    write(sink, batch(4, [{"id": 14}]))
    assert db.query("SELECT id FROM analytics.orders ORDER BY id") == [(12,), (14,)]
    assert db.query("SELECT last_seq FROM analytics.nilus_positions") == [(4,)]


def test_window_replacement_replaces_only_the_window(postgres_database) -> None:
    db = postgres_database
    sink = opened(db.location())
    write(sink, batch(1, [{"id": i} for i in range(1, 6)]))  # minutes 0..4
    replay = sink.prepare(batch(2, [{"id": 20}, {"id": 30}, {"id": 40}, {"id": 50}], minutes=1))
    start, end = T0 + timedelta(minutes=1), T0 + timedelta(minutes=3)
    result = sink.replace_window(replay.rows, None, start=start, end=end)
    assert result.rows_written == 2 and result.position == 5
    assert db.query("SELECT id FROM analytics.orders ORDER BY _nats_seq, id") == [
        (1,),
        (20,),
        (30,),
        (4,),
        (5,),
    ]
    assert db.query("SELECT last_seq FROM analytics.nilus_positions") == [(5,)]


def test_a_second_writer_waits_on_the_position_lock_then_conflicts(postgres_database) -> None:
    import psycopg

    db = postgres_database
    first = opened(db.location())
    write(first, batch(1, [{"id": 1}]))
    second = opened(db.location())
    write(first, batch(2, [{"id": 2}]))
    with pytest.raises(PositionConflict):
        write(second, batch(2, [{"id": 2}]))
    assert second.open().position == 2

    # While another transaction holds the position row, a commit waits for it.
    holder = psycopg.connect(db.url)
    holder.execute("SELECT * FROM analytics.nilus_positions FOR UPDATE")
    outcome: list[object] = []
    thread = threading.Thread(
        target=lambda: outcome.append(_attempt(lambda: write(second, batch(3, [{"id": 3}]))))
    )
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and not outcome
    holder.execute("UPDATE analytics.nilus_positions SET last_seq = 3")
    holder.commit()
    holder.close()
    thread.join(10)
    assert isinstance(outcome[0], PositionConflict)
    assert db.query("SELECT count(*) FROM analytics.orders") == [(2,)]


def test_two_writers_creating_the_same_schema_at_once_both_go_on(postgres_database) -> None:
    # CREATE SCHEMA IF NOT EXISTS is not safe against a concurrent one: the loser of the race
    # gets a unique violation on pg_namespace (seen when two runs of one pipeline started).
    connections = [PostgresConnection(postgres_database.url) for _ in range(2)]
    names = [f"race_{i}" for i in range(40)]
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def create_all(conn: PostgresConnection) -> None:
        for name in names:
            start.wait()
            outcomes.append(_attempt(lambda n=name: ensure_schema(conn, n, where="test")))
            start.wait()  # then the position table in it, raced the same way
            outcomes.append(_attempt(lambda n=name: ensure_positions_table(conn, n, "test")))

    threads = [threading.Thread(target=create_all, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for conn in connections:
        conn.close()

    assert outcomes == [None] * 160
    found = postgres_database.query("SELECT count(*) FROM pg_namespace WHERE nspname ~ '^race_'")
    assert found == [(40,)]
    tables = postgres_database.query(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'nilus_positions'"
    )
    assert tables == [(40,)]


def _attempt(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except Exception as exc:
        return exc


def test_quoted_identifiers_for_reserved_words_mixed_case_and_dashes(postgres_database) -> None:
    db = postgres_database
    sink = opened(db.location("Order-Data.select"))
    write(sink, batch(1, [{"Mixed Case": 1, "from": "x", "a-b": True}]))
    assert db.query('SELECT "Mixed Case", "from", "a-b" FROM "Order-Data"."select"') == [
        (1, "x", True)
    ]


def test_names_over_63_bytes(postgres_database) -> None:
    db = postgres_database
    with pytest.raises(SinkError, match="63 bytes"):
        PostgresSink(db.location("analytics." + "t" * 50), app_id=APP)
    sink = opened(db.location())
    long = "f" * 64
    result = write(sink, batch(1, [{"id": 1}, {"id": 2, long: 1}]))
    assert (result.rows_written, result.dead_letters) == (1, 1)
    error = db.query("SELECT error FROM analytics.orders__dead_letters")[0][0]
    assert "63-byte" in error and long in error


def test_factory_picks_the_writer_from_the_location(postgres_database) -> None:
    from nilus_dagster.manifest.model import SinkOptions

    options = SinkOptions(
        dest_table="analytics.orders", incremental_strategy="merge", primary_key=["id"]
    )
    sink = sink_writer(postgres_database.location(), options, app_id=APP)
    assert isinstance(sink, PostgresSink) and sink.primary_key == ("id",)


def test_the_unique_indexes_merge_can_upsert_through(postgres_database) -> None:
    from nilus_dagster.sink.postgres_catalog import connect, unique_indexes_on

    db = postgres_database
    db.query(
        'CREATE SCHEMA s; CREATE TABLE s.t ("Id" bigint, region text, v text, '
        'CONSTRAINT t_later UNIQUE ("Id", v) DEFERRABLE INITIALLY DEFERRED)'
    )
    db.query('CREATE UNIQUE INDEX t_both ON s.t (region, "Id") INCLUDE (v)')
    db.query('CREATE UNIQUE INDEX t_partial ON s.t ("Id") WHERE v IS NOT NULL')
    db.query("CREATE UNIQUE INDEX t_expression ON s.t (lower(region))")
    conn = connect(db.options(), "test")
    try:
        # Either order of the key; INCLUDE columns are not key columns; names keep their case.
        assert unique_indexes_on(conn, "s", "t", ["Id", "region"]) == [("t_both", True)]
        assert unique_indexes_on(conn, "s", "t", ["region", "Id"]) == [("t_both", True)]
        assert unique_indexes_on(conn, "s", "t", ["id", "region"]) == []
        assert unique_indexes_on(conn, "s", "t", ["Id"]) == []  # partial: ON CONFLICT skips it
        assert unique_indexes_on(conn, "s", "t", ["region"]) == []  # an expression
        assert unique_indexes_on(conn, "s", "t", ["Id", "v"]) == [("t_later", False)]
    finally:
        conn.close()


def test_a_deferrable_key_index_or_one_made_for_another_key_is_named_at_open(
    postgres_database,
) -> None:
    db = postgres_database
    sink = opened(db.location(), strategy="merge", primary_key=["id"])
    write(sink, batch(1, [{"id": 1, "region": "eu"}, {"id": 2, "region": "us"}]))
    sink.close()

    # The key grew: the index merge made for the old one holds the name of the new one.
    with pytest.raises(SinkError) as refused:
        opened(db.location(), strategy="merge", primary_key=["id", "region"])
    message = str(refused.value)
    assert "'orders__nilus_key', which merge made for an earlier primary_key, covers (id)" in (
        message
    )
    assert 'DROP INDEX "analytics"."orders__nilus_key"' in message
    db.query('DROP INDEX "analytics"."orders__nilus_key"')  # as it says
    grown = opened(db.location(), strategy="merge", primary_key=["id", "region"])
    write(grown, batch(3, [{"id": 1, "region": "us", "v": 1}, {"id": 2, "region": "us", "v": 2}]))
    assert db.query("SELECT id, region, v FROM analytics.orders ORDER BY id, region") == [
        (1, "eu", None),
        (1, "us", 1),
        (2, "us", 2),
    ]
    grown.close()

    db.query(
        "ALTER TABLE analytics.orders ADD CONSTRAINT orders_key UNIQUE (id, region) "
        "DEFERRABLE INITIALLY IMMEDIATE"
    )
    with pytest.raises(SinkError, match=r"'orders_key' on \(id, region\).*is deferrable.*NOT DEF"):
        opened(db.location(), strategy="merge", primary_key=["id", "region"])
