"""Connecting to PostgreSQL and reading its catalog, each failure as an error that says what to do.

Everything here runs before a row is written: the connection (unreachable server, wrong
password, missing database, no CONNECT), a read-only server, the schema (created when the user
may), the privileges each strategy needs (named, with the ``GRANT`` that fixes them) and the
table's columns, checked against what the rows need.
"""

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import adbc_driver_manager

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.postgres_url import connection_uri
from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_types import qualified, quote
from nilus_dagster.sink.writer import PositionConflict, error_text

if TYPE_CHECKING:
    import pyarrow as pa

POSITIONS_TABLE = "nilus_positions"
"""Per schema: one row per (pipeline, table) holding the committed position."""

CONNECT_TIMEOUT_SECONDS = "10"

# The metadata columns every table needs, and the column types that can hold them.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "_nats_subject": ("text", "character varying"),
    "_nats_seq": ("bigint", "numeric"),
    "_nats_timestamp": ("timestamp with time zone", "timestamp without time zone"),
    "_nats_headers": ("jsonb", "json"),
}


def connect(options: Mapping[str, str], where: str) -> PostgresConnection:
    """A connection (autocommit off) to the database ``options`` name.

    Raises:
        SinkError: The server cannot be reached, refuses the user, or lacks the database.
    """
    params = dict(options)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    try:
        return PostgresConnection(connection_uri(params))
    except adbc_driver_manager.Error as exc:
        raise connect_error(exc, options, where) from None


def connect_error(exc: Exception, options: Mapping[str, str], where: str) -> SinkError:
    """The clear error for a failed connection: which cause, and what to change."""
    text = error_text(exc)
    host, port = options.get("host", "localhost"), options.get("port", "5432")
    db, user = options.get("dbname", ""), options.get("user", "(default user)")
    lowered = text.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        cause = (
            f"PostgreSQL at {host}:{port} refused the password of user {user!r}: set the right "
            "password in the address's password variable (or the resource's password)"
        )
    elif "role" in lowered and "does not exist" in lowered:
        cause = f"PostgreSQL at {host}:{port} has no user {user!r}: fix the user in the address"
    elif "database" in lowered and "does not exist" in lowered:
        cause = (
            f"database {db!r} does not exist on {host}:{port}: create it (CREATE DATABASE "
            f"{quote(db)}) or fix the database in the address"
        )
    elif "permission denied for database" in lowered or "connect privilege" in lowered:
        cause = (
            f"user {user!r} lacks CONNECT on database {db!r}: GRANT CONNECT ON DATABASE "
            f"{quote(db)} TO {quote(user)}"
        )
    elif any(
        word in lowered
        for word in ("refused", "could not translate", "timeout", "no route", "unreachable")
    ):
        cause = (
            f"cannot reach PostgreSQL at {host}:{port}: check the host and port in the address "
            "and that the server is running and accepts TCP connections"
        )
    else:
        cause = f"cannot connect to PostgreSQL at {host}:{port}/{db}"
    return SinkError(f"{where}: {cause} ({text})")


def check_writable(conn: PostgresConnection, where: str) -> None:
    """Raises: SinkError: The server or database only allows reading."""
    if conn.query("SELECT current_setting('transaction_read_only')")[0][0] == "on":
        raise SinkError(
            f"{where}: the PostgreSQL server is read-only (a standby, or "
            "default_transaction_read_only is on): point the sink at the primary server"
        )


def ensure_schema(conn: PostgresConnection, schema: str, *, where: str) -> None:
    """Create ``schema`` when it is missing and the user may; check USAGE on it.

    Raises:
        SinkError: It is missing and may not be created, or the user lacks USAGE.
    """
    rows = _schema_usage(conn, schema)
    if not rows:
        user, db = conn.query("SELECT current_user, current_database()")[0]
        may_create = conn.query("SELECT has_database_privilege(current_database(), 'CREATE')")
        if not may_create[0][0]:
            raise SinkError(
                f"{where}: schema {schema!r} does not exist in database {db!r} and user "
                f"{user!r} may not create it (no CREATE on the database): create it "
                f"(CREATE SCHEMA {quote(schema)}) or GRANT CREATE ON DATABASE {quote(db)} "
                f"TO {quote(user)}"
            )
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(schema)}")
            conn.commit()
            return
        except Exception as exc:
            # IF NOT EXISTS does not cover a schema created by another writer at the same
            # moment: that one is a unique violation on pg_namespace. Its schema will do.
            if not _lost_race(exc):
                raise
            conn.rollback()
            rows = _schema_usage(conn, schema)
            if not rows:
                raise
    usage, user, _ = rows[0]
    if not usage:
        raise SinkError(
            f"{where}: user {user!r} lacks USAGE on schema {schema!r}: "
            f"GRANT USAGE ON SCHEMA {quote(schema)} TO {quote(user)}"
        )


def _schema_usage(conn: PostgresConnection, schema: str) -> list[tuple[Any, ...]]:
    """``[(may use, current user, current database)]`` if ``schema`` exists, else ``[]``."""
    return conn.query(
        "SELECT has_schema_privilege(oid, 'USAGE'), current_user, current_database() "
        "FROM pg_namespace WHERE nspname = $1",
        [schema],
    )


def check_create(conn: PostgresConnection, schema: str, what: str, where: str) -> None:
    """Raises: SinkError: The user may not create ``what`` in ``schema`` (CREATE missing)."""
    may, user = conn.query("SELECT has_schema_privilege($1, 'CREATE'), current_user", [schema])[0]
    if not may:
        raise SinkError(
            f"{where}: user {user!r} lacks CREATE on schema {schema!r}, needed to create "
            f"{what}: GRANT CREATE ON SCHEMA {quote(schema)} TO {quote(user)}, or create it "
            "first"
        )


def check_table_privileges(
    conn: PostgresConnection,
    schema: str,
    table: str,
    privileges: Sequence[str],
    why: str,
    where: str,
) -> None:
    """Raises: SinkError: naming the first privilege on the table the user lacks, and why."""
    name = qualified(schema, table)
    for privilege in privileges:
        has, user = conn.query(
            "SELECT has_table_privilege($1, $2), current_user", [name, privilege]
        )[0]
        if not has:
            raise SinkError(
                f"{where}: user {user!r} lacks {privilege} on table {schema}.{table} ({why}): "
                f"GRANT {privilege} ON {name} TO {quote(user)}"
            )


def unique_indexes_on(
    conn: PostgresConnection, schema: str, table: str, key: Sequence[str]
) -> list[tuple[str, bool]]:
    """``(name, immediate)`` of each unique index on exactly the columns ``key``.

    ``ON CONFLICT (key)`` takes every one of them (a primary key too, whoever made it); partial
    and expression indexes it does not, and a deferrable one (``immediate`` false) makes it fail.
    """
    found = conn.query(
        "SELECT ic.relname, i.indimmediate FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indisvalid "
        "AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnkeyatts = $3 "
        "AND (SELECT string_agg(a.attname, chr(31) ORDER BY a.attname) FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND a.attnum = ANY((i.indkey::int2[])[0:i.indnkeyatts - 1])) "
        "= $4 ORDER BY ic.relname",
        [schema, table, len(key), chr(31).join(sorted(key))],
    )
    return [(str(name), bool(immediate)) for name, immediate in found]


def has_unique_index(conn: PostgresConnection, schema: str, table: str, key: Sequence[str]) -> bool:
    """Whether ``ON CONFLICT (key)`` has a unique index to use (see :func:`unique_indexes_on`)."""
    return any(immediate for _, immediate in unique_indexes_on(conn, schema, table, key))


def index_columns(conn: PostgresConnection, schema: str, index: str) -> list[str] | None:
    """The key columns of the index named ``index`` in ``schema``; ``None`` when there is none."""
    found = conn.query(
        "SELECT a.attname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = ic.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[]) "
        "WHERE n.nspname = $1 AND ic.relname = $2 ORDER BY a.attname",
        [schema, index],
    )
    if found:
        return [str(name) for (name,) in found]
    exists = conn.query(
        "SELECT 1 FROM pg_class ic JOIN pg_namespace n ON n.oid = ic.relnamespace "
        "WHERE n.nspname = $1 AND ic.relname = $2",
        [schema, index],
    )
    return [] if exists else None


def check_merge_key(
    conn: PostgresConnection,
    schema: str,
    table: str,
    key: Sequence[str],
    own_index: str,
    where: str,
) -> None:
    """Check that merge's upsert on ``key`` can run against the existing table.

    Raises:
        SinkError: A unique index on ``key`` is deferrable (the upsert refuses it); or there is
            none and the one merge would make cannot be: its name holds an index on other
            columns (made for an earlier ``primary_key``), or only the table's owner may
            create indexes on it.
    """
    name = qualified(schema, table)
    indexes = unique_indexes_on(conn, schema, table, key)
    deferred = [index for index, immediate in indexes if not immediate]
    if deferred:
        raise SinkError(
            f"{where}: the unique index {deferred[0]!r} on ({', '.join(key)}) of table "
            f"{schema}.{table} is deferrable, and merge's upsert (INSERT ... ON CONFLICT) "
            "refuses deferrable indexes: make its constraint NOT DEFERRABLE (ALTER TABLE "
            f"{name} ALTER CONSTRAINT {quote(deferred[0])} NOT DEFERRABLE), or drop it"
        )
    if indexes:
        return
    held = index_columns(conn, schema, own_index)
    if held is not None:
        raise SinkError(
            f"{where}: merge on primary_key ({', '.join(key)}) needs a unique index on those "
            f"columns; {own_index!r}, which merge made for an earlier primary_key, covers "
            f"({', '.join(held)}): drop it (DROP INDEX {qualified(schema, own_index)}) and the "
            "next run makes it on the new key, provided no two rows share a key"
        )
    check_can_index(conn, schema, table, key, where)


def check_can_index(
    conn: PostgresConnection, schema: str, table: str, key: Sequence[str], where: str
) -> None:
    """Check that the user may create merge's unique index on ``key`` (the table has none).

    PostgreSQL lets only a table's owner create an index on it, ``IF NOT EXISTS`` or not; a
    user with every privilege merge needs is refused at the first commit otherwise.

    Raises:
        SinkError: The user does not own the table, naming the owner and the statement to run.
    """
    owner, user, owns = conn.query(
        "SELECT pg_get_userbyid(c.relowner), current_user, "
        "pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
        [schema, table],
    )[0]
    if not owns:
        columns = ", ".join(quote(k) for k in key)
        raise SinkError(
            f"{where}: merge on primary_key ({', '.join(key)}) needs a unique index on those "
            f"columns of table {schema}.{table}, which has none, and only its owner "
            f"{owner!r} may create one (user {user!r} is not the owner): have the owner run "
            f"CREATE UNIQUE INDEX ON {qualified(schema, table)} ({columns})"
        )


def table_columns(conn: PostgresConnection, schema: str, table: str) -> dict[str, str] | None:
    """The table's columns and their types in order, ``None`` when there is no such table."""
    rows = conn.query(
        "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        [schema, table],
    )
    if not rows:
        exists = conn.query(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = $2",
            [schema, table],
        )
        return {} if exists else None
    return {str(name): str(kind) for name, kind in rows}


def check_compatible(columns: Mapping[str, str], schema: str, table: str, where: str) -> None:
    """Raises: SinkError: The existing table cannot hold the rows' metadata columns."""
    problems = []
    for name, types in REQUIRED_COLUMNS.items():
        found = columns.get(name)
        if found is None:
            problems.append(f"{name} is missing")
        elif found not in types:
            problems.append(f"{name} is {found}, not {' or '.join(types)}")
    if problems:
        raise SinkError(
            f"{where}: the existing table {schema}.{table} has incompatible columns "
            f"({'; '.join(problems)}): it was not made for this pipeline's rows. Write to "
            "another dest_table, or drop or fix that table (the metadata columns are "
            "_nats_subject text, _nats_seq bigint, _nats_timestamp timestamptz, "
            "_nats_headers jsonb)"
        )


def ensure_positions_table(conn: PostgresConnection, schema: str, where: str) -> None:
    """Create ``<schema>.nilus_positions`` when missing; check the user may read and move it."""
    if table_columns(conn, schema, POSITIONS_TABLE) is None:
        check_create(conn, schema, f"the position table {schema}.{POSITIONS_TABLE}", where)
        try:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {qualified(schema, POSITIONS_TABLE)} ("
                "pipeline text NOT NULL, table_name text NOT NULL, last_seq bigint NOT NULL, "
                "stream_created text, newest_timestamp timestamptz, "
                "updated_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (pipeline, table_name))",
            )
            conn.commit()
        except Exception as exc:
            # Another writer created it at the same moment (a unique violation on the type).
            if not _lost_race(exc):
                raise
            conn.rollback()
            if table_columns(conn, schema, POSITIONS_TABLE) is None:
                raise
    check_table_privileges(
        conn,
        schema,
        POSITIONS_TABLE,
        ("SELECT", "INSERT", "UPDATE"),
        "the pipeline's position is kept there",
        where,
    )


# How libpq and the server say the connection is gone (the server shut down or restarted:
# SQLSTATE 57P01..57P03, or no SQLSTATE at all when the socket just closed).
_LOST = (
    "server closed the connection",
    "no connection to the server",
    "terminating connection",
    "the database system is shutting down",
    "the database system is starting up",
    "could not receive data from server",
    "could not send data to server",
)

# SQLSTATEs of a lost race with another writer creating the same schema, table, column or
# index: duplicate table, column, schema, and object (a table's row type, seen when two runs
# created the position table at once), a deadlock, a serialization failure. A unique violation
# (23505) is one only on the system catalogs' own indexes (pg_type, pg_class for a table or
# index created at the same time); on the table it is the rows that are refused, and they would
# be refused again at every retry.
_RACES = ("42P07", "42701", "42P06", "42710", "40P01", "40001")
_CATALOG_RACE = re.compile(r'unique constraint "pg_[a-z_]+"')
_DUPLICATE_KEY = re.compile(r"Key \((?P<key>[^)]*)\)=")


def _is_catalog_race(exc: Exception, text: str) -> bool:
    """Whether a unique violation is on the system catalogs (a concurrent CREATE), not a table.

    The server names the violated index's schema (``PG_DIAG_SCHEMA_NAME``, which ADBC passes on
    in ``details``); without it, the catalogs' index names (``pg_type_typname_nsp_index``) say
    so, though a user may name an index ``pg_...`` too.
    """
    details = getattr(exc, "details", None)
    if isinstance(details, list):
        for key, value in details:
            if key in (b"PG_DIAG_SCHEMA_NAME", "PG_DIAG_SCHEMA_NAME"):
                name = value.decode() if isinstance(value, bytes) else str(value)
                return name == "pg_catalog"
    return bool(_CATALOG_RACE.search(text))


def _lost_race(exc: Exception) -> bool:
    """Whether ``exc`` is another writer creating or changing the same object at that moment."""
    state = str(getattr(exc, "sqlstate", "") or "")
    return state in _RACES or (state == "23505" and _is_catalog_race(exc, error_text(exc)))


def write_error(exc: Exception, where: str) -> SinkError:
    """The clear error for a failed commit (rolled back: nothing was written)."""
    if isinstance(exc, SinkError):
        return exc
    text = error_text(exc)
    state = str(getattr(exc, "sqlstate", "") or "")
    if _lost_race(exc):
        return PositionConflict(f"{where}: another writer changed the table ({text}); open() again")
    if state == "23505":
        return _refused_as_duplicates(text, where)
    if state == "25006" or "read-only transaction" in text:
        return SinkError(
            f"{where}: the server is read-only (a standby, or default_transaction_read_only "
            f"is on): point the sink at the primary server ({text})"
        )
    if state == "42501" or "permission denied" in text or "must be owner" in text:
        return SinkError(
            f"{where}: a privilege is missing ({text}). The sink user needs USAGE and CREATE "
            "on the schema, INSERT (merge: SELECT, UPDATE, DELETE; replace: TRUNCATE) on the "
            "table, and ownership of the table to add columns"
        )
    if state.startswith(("08", "57P")) or any(sign in text for sign in _LOST):
        return SinkError(f"{where}: the connection to PostgreSQL was lost ({text}); retry")
    return SinkError(f"{where}: {text}")


def _refused_as_duplicates(text: str, where: str) -> SinkError:
    """A unique index refused rows, or could not be built over the rows already there."""
    found = _DUPLICATE_KEY.search(text)
    key = f" on ({found.group('key')})" if found else ""
    if "could not create unique index" in text:
        return SinkError(
            f"{where}: merge needs a unique index{key}, and the table already holds rows with "
            f"duplicate keys ({text}): remove the duplicates, or write the merge to a new "
            "dest_table; nothing was committed"
        )
    return SinkError(
        f"{where}: a unique index or constraint of the table{key} refused rows whose key it "
        f"already holds ({text}): messages may repeat a key, so drop that index or "
        "constraint, or set incremental_strategy: merge with that primary_key under "
        "spec.sink.options; nothing was committed"
    )


def read_table(
    options: Mapping[str, str],
    schema: str,
    table: str,
    window: "tuple[datetime, datetime] | None",
    where: str,
) -> "pa.Table":
    """The table (or the rows whose ``_nats_timestamp`` is in ``[start, end)``) as Arrow.

    For downstream assets: one query, read as Arrow by the driver, so no row becomes a Python
    object. ``jsonb`` columns come back as their JSON text.

    Raises:
        SinkError: The server cannot be reached or the table cannot be read.
    """
    conn = connect(options, where)
    sql = f"SELECT * FROM {qualified(schema, table)}"
    params: tuple[Any, ...] = ()
    if window is not None:
        sql += " WHERE _nats_timestamp >= $1 AND _nats_timestamp < $2"
        params = window
    try:
        return conn.read_arrow(sql, params)
    except Exception as exc:
        raise SinkError(f"cannot read {where}: {error_text(exc)}") from None
    finally:
        conn.close()
