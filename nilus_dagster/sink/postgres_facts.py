"""Facts about a PostgreSQL table for run metadata: its rows, counted or estimated."""

from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_types import qualified

EXACT_COUNT_ROWS = 1_000_000
"""Up to about this many rows (by PostgreSQL's estimate) the run metadata's row count is an
exact ``count(*)``; beyond, the estimate. A count scans the table: about 0.1 s at 3 million
rows here, seconds at hundreds of millions, at every run and every service report."""

# Whether the user may count, and the planner's own estimate: the rows per page the last
# ANALYZE or VACUUM found (autovacuum keeps it) times the table's pages now, so it follows a
# table that grew since. The estimate is NULL for a table never analyzed and for anything but
# a plain table (a partitioned parent has no pages of its own); both are NULL for no table.
_FACTS = (
    "SELECT has_table_privilege(c.oid, 'SELECT'), CASE WHEN c.relkind = 'r' AND c.relpages > 0"
    " AND c.reltuples >= 0 THEN c.reltuples / c.relpages * (pg_relation_size(c.oid)"
    " / current_setting('block_size')::float8) END "
    "FROM (SELECT to_regclass($1) AS oid) AS wanted LEFT JOIN pg_class c ON c.oid = wanted.oid"
)


def count_rows(
    conn: PostgresConnection, schema: str, table: str, exact_up_to: int | None = EXACT_COUNT_ROWS
) -> tuple[int | None, bool]:
    """``(rows, estimated)`` of ``schema.table``: counted up to ``exact_up_to``, else estimated.

    A user without SELECT on the table (``append`` needs only INSERT) gets the estimate, or
    ``(None, False)`` while PostgreSQL has none: the row count must not fail a run that
    committed.

    Args:
        conn: An open connection (its transaction is left open).
        schema: The table's schema.
        table: The table.
        exact_up_to: Above this estimate, the estimate is returned; ``None`` always counts
            (and needs SELECT).
    """
    name = qualified(schema, table)
    if exact_up_to is not None:
        may_select, estimate = conn.query(_FACTS, [name])[0]
        if estimate is not None and (estimate > exact_up_to or may_select is False):
            return round(estimate), True
        if may_select is False:
            return None, False
    return int(conn.query(f"SELECT count(*) FROM {name}")[0][0]), False
