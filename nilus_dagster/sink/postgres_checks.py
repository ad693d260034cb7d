"""What the PostgreSQL sink checks when it opens, and before a backfill deletes a window.

Everything here runs before a row is written, so a refusal loses nothing; each names what the
user lacks or what to change, through :mod:`nilus_dagster.sink.postgres_catalog`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from nilus_dagster.errors import SinkError
from nilus_dagster.sink import postgres_catalog as catalog
from nilus_dagster.sink.postgres_catalog import POSITIONS_TABLE
from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_load import short_name
from nilus_dagster.sink.postgres_types import qualified

# What each strategy does to an existing table, and why, for the error that names a privilege.
_STRATEGY_PRIVILEGES: dict[str, tuple[tuple[str, ...], str]] = {
    "append": (("INSERT",), "rows are appended"),
    "merge": (("INSERT", "SELECT", "UPDATE", "DELETE"), "merge inserts and updates rows"),
    "replace": (("INSERT", "TRUNCATE"), "replace empties the table with TRUNCATE and refills it"),
}


@dataclass(frozen=True)
class OpenedTable:
    """The table as :func:`check_and_read` found it.

    Attributes:
        columns: The table's columns and types, ``None`` when it does not exist yet.
        dead_columns: The same for its dead-letter table.
        position: The pipeline's committed position (0 without a position row).
        stream_created: The stream's creation time recorded with the position.
        newest: The newest message time committed.
    """

    columns: dict[str, str] | None
    dead_columns: dict[str, str] | None
    position: int
    stream_created: str | None
    newest: datetime | None


def check_and_read(
    conn: PostgresConnection,
    *,
    schema: str,
    table: str,
    dead_table: str,
    app_id: str,
    strategy: str,
    primary_key: Sequence[str],
    create_table: bool,
    where: str,
) -> OpenedTable:
    """Check that the database can take the pipeline's rows, then read its position.

    Raises:
        SinkError: The server is read-only, the schema is missing and may not be created, a
            privilege is missing, the table is missing with ``create_table`` false, has
            incompatible columns, or lacks an index merge can use and cannot get one.
    """
    catalog.check_writable(conn, where)
    catalog.ensure_schema(conn, schema, where=where)
    catalog.ensure_positions_table(conn, schema, where)
    columns = catalog.table_columns(conn, schema, table)
    if columns is None:
        if not create_table:
            raise SinkError(
                f"{where}: table {schema}.{table} does not exist and create_table is false: "
                "create the table first, or set create_table: true under spec.sink.options "
                "to let the first run create it"
            )
        catalog.check_create(conn, schema, f"table {schema}.{table}", where)
    else:
        catalog.check_compatible(columns, schema, table, where)
        privileges, why = _STRATEGY_PRIVILEGES.get(strategy, _STRATEGY_PRIVILEGES["append"])
        catalog.check_table_privileges(conn, schema, table, privileges, why, where)
        key = primary_key if strategy == "merge" else ()
        if key and all(k in columns for k in key):
            own_index = short_name(f"{table}__nilus_key")
            catalog.check_merge_key(conn, schema, table, key, own_index, where)
    dead_columns = catalog.table_columns(conn, schema, dead_table)
    if dead_columns is not None:
        catalog.check_table_privileges(
            conn, schema, dead_table, ("INSERT",), "dead letters go there", where
        )
    found = conn.query(
        f"SELECT last_seq, stream_created, newest_timestamp FROM "
        f"{qualified(schema, POSITIONS_TABLE)} WHERE pipeline = $1 AND table_name = $2",
        [app_id, table],
    )
    conn.commit()
    position, created, newest = found[0] if found else (0, None, None)
    return OpenedTable(columns, dead_columns, position, created, newest)


def check_window_privileges(
    conn: PostgresConnection, schema: str, tables: Sequence[str], where: str
) -> None:
    """Check ``DELETE`` on ``tables``: a backfill of an append or replace pipeline needs it.

    No transaction stays open afterwards, so a later attempt sees a ``GRANT`` made meanwhile.

    Raises:
        SinkError: Naming the table the user may not delete from, with the ``GRANT``.
    """
    why = "a backfill deletes the window's rows before loading them again"
    try:
        for table in tables:
            catalog.check_table_privileges(conn, schema, table, ("DELETE",), why, where)
    finally:
        conn.rollback()
