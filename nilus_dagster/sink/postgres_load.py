"""Arrow rows into a PostgreSQL table: creating and widening it, the bulk load, the merge.

Each function runs inside the caller's transaction and never commits: the sink decides what
goes into one transaction with the position row.
"""

import hashlib
from collections.abc import Mapping, Sequence

import pyarrow as pa

from nilus_dagster.sink.postgres_catalog import has_unique_index
from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_types import column_for, postgres_type, qualified, quote
from nilus_dagster.sink.rows import latest_per_key

_STAGE = "nilus_stage"


def ensure_table(
    conn: PostgresConnection,
    schema: str,
    table: str,
    rows: pa.Table,
    columns: dict[str, str] | None,
    *,
    unique_key: Sequence[str] = (),
) -> dict[str, str]:
    """Create the table, or add the rows' new columns; returns the columns after that.

    Args:
        conn: The connection (its transaction).
        schema: The table's schema.
        table: The table.
        rows: Rows about to be loaded: each column with a type (not only nulls) is made.
        columns: The table's columns before, ``None`` when it does not exist.
        unique_key: Columns of a unique index made once they all exist (``merge``'s key).
    """
    name = qualified(schema, table)
    wanted = {
        f.name: kind
        for f in rows.schema
        if (kind := postgres_type(f.type)) is not None
        and (columns is None or f.name not in columns)
    }
    if columns is None:
        body = ", ".join(f"{quote(n)} {k}" for n, k in wanted.items())
        conn.execute(f"CREATE TABLE {name} ({body})")
        columns = {}
    elif wanted:
        adds = ", ".join(f"ADD COLUMN IF NOT EXISTS {quote(n)} {k}" for n, k in wanted.items())
        conn.execute(f"ALTER TABLE {name} {adds}")
    columns = {**columns, **wanted}
    if (
        unique_key
        and all(k in columns for k in unique_key)
        and not has_unique_index(conn, schema, table, unique_key)
    ):
        # Before that, no key column yet: the first keyed rows create it. Looked up first:
        # only the owner may run CREATE INDEX, even one that exists already.
        index = quote(short_name(f"{table}__nilus_key"))
        keys = ", ".join(quote(k) for k in unique_key)
        conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {name} ({keys})")
    return columns


def load(
    conn: PostgresConnection, schema: str, table: str, rows: pa.Table, columns: Mapping[str, str]
) -> None:
    """Bulk-load ``rows`` (binary ``COPY`` through ADBC) into a table that has their columns."""
    if rows.num_rows == 0:
        return
    conn.bulk_load(table, for_postgres(rows, columns), schema=schema)


def merge(
    conn: PostgresConnection,
    schema: str,
    table: str,
    rows: pa.Table,
    columns: Mapping[str, str],
    primary_key: Sequence[str],
    newer: str,
) -> None:
    """Upsert through a staging table; a row is replaced only by a newer message.

    ``newer`` is ``<`` for runs, ``<=`` for window replays.
    """
    if rows.num_rows == 0:
        return
    data = for_postgres(latest_per_key(rows, primary_key), columns)
    target = qualified(schema, table)
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE {target}) ON COMMIT DROP")
    conn.bulk_load(_STAGE, data, temporary=True)
    names = ", ".join(quote(n) for n in data.column_names)
    keys = ", ".join(quote(k) for k in primary_key)
    updates = ", ".join(
        f"{quote(n)} = EXCLUDED.{quote(n)}" for n in data.column_names if n not in primary_key
    )
    conn.execute(
        f"INSERT INTO {target} AS t ({names}) SELECT {names} FROM {_STAGE} "
        f"ON CONFLICT ({keys}) DO UPDATE SET {updates} "
        f"WHERE t._nats_seq {newer} EXCLUDED._nats_seq",
    )


def for_postgres(rows: pa.Table, columns: Mapping[str, str]) -> pa.Table:
    """``rows`` with each column in the form the bulk load writes into its table column."""
    arrays, names = [], []
    for field, column in zip(rows.schema, rows.columns, strict=True):
        kind = columns.get(field.name)
        if kind is None:  # only nulls so far: no column was made for it
            continue
        arrays.append(column_for(column, kind))
        names.append(field.name)
    return pa.table(arrays, names=names)


def short_name(name: str) -> str:
    """``name``, or when over 63 bytes its first 50 bytes and a digest of the whole."""
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return name.encode()[:50].decode("utf-8", "ignore") + "_" + digest
