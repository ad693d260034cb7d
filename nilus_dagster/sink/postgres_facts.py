"""Facts about a PostgreSQL table for run metadata: its rows, counted or estimated."""

from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_types import qualified

EXACT_COUNT_ROWS = 1_000_000
"""Up to about this many rows (by PostgreSQL's estimate) the run metadata's row count is an
exact ``count(*)``; beyond, the estimate. A count scans the table: about 0.1 s at 3 million
rows here, seconds at hundreds of millions, at every run and every service report."""

# The planner's own estimate: the rows per page the last ANALYZE or VACUUM found (autovacuum
# keeps it) times the table's pages now, so it follows a table that grew since. NULL when the
# table was never analyzed, or is a partitioned parent (no pages of its own).
_ESTIMATED_ROWS = (
    "SELECT CASE WHEN c.reltuples < 0 OR c.relpages = 0 THEN NULL ELSE c.reltuples / c.relpages"
    " * (pg_relation_size(c.oid) / current_setting('block_size')::float8) END "
    "FROM pg_class c WHERE c.oid = to_regclass($1)"
)


def count_rows(
    conn: PostgresConnection, schema: str, table: str, exact_up_to: int | None = EXACT_COUNT_ROWS
) -> tuple[int, bool]:
    """``(rows, estimated)`` of ``schema.table``: counted up to ``exact_up_to``, else estimated.

    Args:
        conn: An open connection (its transaction is left open).
        schema: The table's schema.
        table: The table.
        exact_up_to: Above this estimate, the estimate is returned; ``None`` always counts.
    """
    name = qualified(schema, table)
    if exact_up_to is not None:
        estimate = conn.query(_ESTIMATED_ROWS, [name])[0][0]
        if estimate is not None and estimate > exact_up_to:
            return round(estimate), True
    return int(conn.query(f"SELECT count(*) FROM {name}")[0][0]), False
