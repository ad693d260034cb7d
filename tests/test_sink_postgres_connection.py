"""The PostgreSQL sink's connection: ADBC's low-level API, without its DB-API module."""

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone

import adbc_driver_manager
import pyarrow as pa
import pytest

from nilus_dagster.sink import postgres_connection
from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_types import column_for
from nilus_dagster.sink.schema import HEADERS_TYPE, TIMESTAMP_TYPE

# Runs the CLI in a fresh interpreter (the test session's own imports do not count) and prints
# which of the modules ADBC's DB-API module brings along a PostgreSQL run imported: the DB-API
# modules themselves, pyarrow.dataset (which imports pandas) and polars, about 0.4 s of CPU.
# pandas is not among them: pyarrow imports it anyway on its first conversion of Python values
# (pa.scalar, pa.array), which every run's decoding makes.
_RUN_AND_LIST_IMPORTS = """
import sys
from nilus_dagster.cli import main
code = main(["run", sys.argv[1], "--drain"])
heavy = (
    "adbc_driver_manager.dbapi", "adbc_driver_postgresql.dbapi", "pyarrow.dataset", "polars"
)
print("IMPORTED", [name for name in heavy if name in sys.modules])
sys.exit(code)
"""


def test_a_postgresql_run_imports_neither_the_dbapi_module_nor_pyarrow_dataset_or_polars(
    postgres_database, publisher, stream_pipeline
) -> None:
    subject, pipeline = stream_pipeline(sink_address=postgres_database.url)
    publisher.publish_orders(subject, 30)
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_IMPORTS, str(pipeline.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stdout, done.stdout
    assert postgres_database.query("SELECT count(*) FROM analytics.orders") == [(30,)]


T0 = datetime(2025, 3, 1, 12, 30, tzinfo=timezone.utc)
# Without parameters the driver reads a result through COPY, so an error in a later row arrives
# in the middle of the result stream rather than from the execution.
_FAILS_IN_THE_STREAM = "SELECT 1 / (x - 2) FROM generate_series(1, 3) x"


@pytest.fixture
def conn(postgres_database) -> Iterator[PostgresConnection]:
    connection = PostgresConnection(postgres_database.url)
    try:
        yield connection
    finally:
        connection.close()


def test_a_query_binds_text_integers_and_times_and_returns_python_values(conn) -> None:
    rows = conn.query("SELECT $1::text, $2::bigint, $3::timestamptz, NULL::text", ["a", 7, T0])
    assert rows == [("a", 7, T0, None)]
    assert conn.query("SELECT x FROM generate_series(1, 3) x WHERE x > $1", [1]) == [(2,), (3,)]
    assert conn.query("SELECT 1 WHERE false") == []
    table = conn.read_arrow("SELECT x, x::text AS t FROM generate_series(1, 2) x")
    assert table.to_pylist() == [{"x": 1, "t": "1"}, {"x": 2, "t": "2"}]


def test_an_error_in_the_middle_of_a_result_is_the_adbc_error_with_its_sqlstate(conn) -> None:
    assert postgres_connection.adbc_reader_import() is not None
    with pytest.raises(adbc_driver_manager.Error) as caught:
        conn.query(_FAILS_IN_THE_STREAM)
    assert caught.value.sqlstate == "22012"
    conn.rollback()
    assert conn.query("SELECT 1") == [(1,)]


def test_without_adbcs_reader_results_come_through_pyarrows_public_import(
    conn, monkeypatch
) -> None:
    monkeypatch.setattr(postgres_connection, "adbc_reader_import", lambda: None)
    assert conn.query("SELECT $1::text, 2::bigint", ["a"]) == [("a", 2)]
    assert conn.read_arrow("SELECT 1 AS one").to_pylist() == [{"one": 1}]
    with pytest.raises(Exception, match="division by zero"):  # pyarrow's error, no SQLSTATE
        conn.query(_FAILS_IN_THE_STREAM)
    conn.rollback()
    assert conn.query("SELECT 1") == [(1,)]


def test_a_bulk_load_joins_the_transaction_into_a_table_or_a_temporary_one(
    conn, postgres_database
) -> None:
    rows = pa.table({"id": pa.array([1, 2], pa.int64()), "note": pa.array(["a", None])})
    conn.execute("CREATE SCHEMA s")
    conn.execute("CREATE TABLE s.t (id bigint, note text)")
    conn.commit()
    conn.bulk_load("t", rows, schema="s")
    conn.rollback()
    assert postgres_database.query("SELECT count(*) FROM s.t") == [(0,)]
    conn.bulk_load("t", rows, schema="s")
    conn.commit()
    assert postgres_database.query("SELECT id, note FROM s.t ORDER BY id") == [(1, "a"), (2, None)]

    conn.execute("CREATE TEMP TABLE stage (LIKE s.t) ON COMMIT DROP")
    conn.bulk_load("stage", rows, temporary=True)
    assert conn.query("SELECT count(*) FROM stage") == [(2,)]
    conn.commit()
    assert conn.query("SELECT to_regclass('pg_temp.stage') IS NULL") == [(True,)]


def test_a_bulk_load_goes_in_batches_of_about_copy_batch_bytes() -> None:
    notes = pa.array([f"note {i} " + "x" * (i % 300) for i in range(20_000)])
    rows = pa.table({"id": pa.array(range(20_000), pa.int64()), "note": notes})
    assert rows.column(0).num_chunks == 1

    batched = postgres_connection.copy_batches(rows, batch_bytes=64 * 1024)
    batches = batched.to_batches()
    assert len(batches) > 20
    assert max(batch.nbytes for batch in batches) < 2 * 64 * 1024
    assert batched.equals(rows)
    # Already small enough, or empty: handed over as it is.
    assert postgres_connection.copy_batches(batched, batch_bytes=64 * 1024) is batched
    assert postgres_connection.copy_batches(rows.slice(0, 0)).num_rows == 0


def test_a_bulk_load_of_many_batches_writes_every_row_once_in_order(conn) -> None:
    n = 40_000
    values = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "note": [None if i % 7 == 0 else f"n{i}" + "y" * (i % 50) for i in range(n)],
            "flag": [None if i % 5 == 0 else i % 3 == 0 for i in range(n)],  # bit-packed
            "amount": [i * 0.25 for i in range(n)],
            "at": pa.array([1_740_000_000_000_000 + i for i in range(n)], TIMESTAMP_TYPE),
            "items": [[{"sku": f"s{i}", "qty": i % 4}] if i % 9 else None for i in range(n)],
        }
    )
    kinds = {"id": "bigint", "note": "text", "flag": "boolean", "amount": "double precision"}
    kinds |= {"at": "timestamptz", "items": "jsonb"}
    shaped = pa.table(
        [column_for(values.column(k), kind) for k, kind in kinds.items()], list(kinds)
    )
    rows = shaped.slice(1_001, 30_000)  # every batch but the first starts at an offset
    conn.execute("CREATE SCHEMA s")
    conn.execute(f"CREATE TABLE s.t ({', '.join(f'{k} {kind}' for k, kind in kinds.items())})")
    conn.bulk_load("t", rows, schema="s")
    conn.commit()

    assert len(postgres_connection.copy_batches(rows).to_batches()) > 1
    loaded = conn.read_arrow(
        "SELECT id, note, flag, amount, at, items::text AS items FROM s.t ORDER BY id"
    )
    expected = values.slice(1_001, 30_000)
    for name in ("id", "note", "flag", "amount", "at"):
        assert loaded.column(name).to_pylist() == expected.column(name).to_pylist(), name
    items = [None if t is None else json.loads(t) for t in loaded.column("items").to_pylist()]
    assert items == expected.column("items").to_pylist()


def test_a_json_column_with_chunks_of_nulls_only_loads_nulls_beside_values(conn) -> None:
    # A run without headers has an all-null _nats_headers: its chunks skip the text building.
    headers = pa.chunked_array(
        [pa.nulls(3, HEADERS_TYPE), pa.array([[("k", "v")], None], HEADERS_TYPE)]
    )
    nothing = pa.chunked_array([pa.nulls(3), pa.nulls(2)])
    rows = pa.table({"h": column_for(headers, "jsonb"), "n": column_for(nothing, "jsonb")})
    conn.execute("CREATE SCHEMA s")
    conn.execute("CREATE TABLE s.t (h jsonb, n jsonb)")
    conn.bulk_load("t", rows, schema="s")
    conn.commit()

    loaded = conn.read_arrow("SELECT h::text AS h, n::text AS n FROM s.t")
    assert loaded.column("h").to_pylist() == [None, None, None, '{"k": "v"}', None]
    assert loaded.column("n").to_pylist() == [None] * 5


def test_binary_values_in_a_json_column_are_hex_text_even_when_all_are_null(conn) -> None:
    kind = pa.struct([("b", pa.binary())])
    only_null = pa.chunked_array([pa.array([{"b": None}], kind)])  # a null-typed list before
    mixed = pa.chunked_array([pa.array([{"b": b"\x01\xff"}, None], kind)])
    conn.execute("CREATE SCHEMA s")
    conn.execute("CREATE TABLE s.t (v jsonb)")
    for values in (only_null, mixed):
        conn.bulk_load("t", pa.table({"v": column_for(values, "jsonb")}), schema="s")
    conn.commit()

    loaded = conn.read_arrow("SELECT v::text AS v FROM s.t")
    assert loaded.column("v").to_pylist() == ['{"b": null}', '{"b": "01ff"}', None]


def test_closing_twice_is_harmless(postgres_database) -> None:
    connection = PostgresConnection(postgres_database.url)
    connection.close()
    connection.close()
