"""A pipeline's stream position in PostgreSQL: its row of ``<schema>.nilus_positions``.

A commit locks the row (``SELECT ... FOR UPDATE``), checks it still holds the position the
writer read, and moves it in the same transaction as the rows.
"""

from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from nilus_dagster.sink.postgres_catalog import POSITIONS_TABLE
from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_types import qualified
from nilus_dagster.sink.writer import PositionConflict
from nilus_dagster.times import as_utc


def lock_position(
    conn: PostgresConnection, schema: str, app_id: str, table: str, *, expected: int, where: str
) -> None:
    """Lock the position row of ``app_id`` and ``table`` for the transaction (made at 0).

    Raises:
        PositionConflict: The row no longer holds ``expected``: another writer moved it.
    """
    positions = qualified(schema, POSITIONS_TABLE)
    key = [app_id, table]
    conn.execute(
        f"INSERT INTO {positions} (pipeline, table_name, last_seq) VALUES ($1, $2, 0) "
        "ON CONFLICT (pipeline, table_name) DO NOTHING",
        key,
    )
    found = conn.query(
        f"SELECT last_seq FROM {positions} WHERE pipeline = $1 AND table_name = $2 FOR UPDATE",
        key,
    )
    current = int(found[0][0])
    if current != expected:
        raise PositionConflict(
            f"{where}: another writer moved the position of {app_id!r} "
            f"from {expected} to {current}; open() again"
        )


def move_position(
    conn: PostgresConnection,
    schema: str,
    app_id: str,
    table: str,
    *,
    last_seq: int,
    created: str | None,
    newest: datetime | None,
) -> None:
    """Set the position row (locked by :func:`lock_position`) to ``last_seq`` and its facts."""
    params: list[object] = [app_id, table, last_seq]
    sets = ["last_seq = $3", "updated_at = now()"]
    for column, value in (("stream_created", created), ("newest_timestamp", newest)):
        # ADBC 1.6 and older cannot bind a None (Arrow's null type): write NULL.
        if value is None:
            sets.append(f"{column} = NULL")
        else:
            params.append(value)
            sets.append(f"{column} = ${len(params)}")
    conn.execute(
        f"UPDATE {qualified(schema, POSITIONS_TABLE)} SET {', '.join(sets)} "
        "WHERE pipeline = $1 AND table_name = $2",
        params,
    )


def newest_timestamp_with(rows: pa.Table, newest: datetime | None) -> datetime | None:
    """The newer of ``newest`` and the newest ``_nats_timestamp`` of ``rows`` (UTC)."""
    if rows.num_rows == 0 or "_nats_timestamp" not in rows.column_names:
        return newest
    found = pc.max(rows.column("_nats_timestamp")).as_py()
    if found is None:
        return newest
    found = as_utc(found)
    return found if newest is None or found > as_utc(newest) else as_utc(newest)
