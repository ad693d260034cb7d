"""The PostgreSQL sink: rows, dead letters and the position in one database transaction.

The position is a row of ``<schema>.nilus_positions`` (pipeline, table, last sequence, the
stream's creation time). Every commit locks that row (``SELECT ... FOR UPDATE``), checks that it
still holds the position this writer read, bulk-loads the rows from Arrow (ADBC's PostgreSQL
driver: binary ``COPY``, never a statement per row), moves the position and commits. A second
writer waits on the lock and then finds the position moved (:class:`PositionConflict`); a
process killed at any point leaves either the whole commit or none of it. With ``append`` the
transaction begins earlier: :meth:`PostgresSink.write_ahead` loads each part of a commit's rows
into it while the engine still pulls, and the commit only adds the rest.
"""

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import ClassVar

import pyarrow as pa

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import DEAD_LETTER_SUFFIX, TableLocation
from nilus_dagster.manifest.model import IncrementalStrategy
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import postgres_catalog as catalog
from nilus_dagster.sink import postgres_checks as checks
from nilus_dagster.sink import postgres_load as load
from nilus_dagster.sink.decode import BatchDecoder, Decoded, PayloadFormat
from nilus_dagster.sink.postgres_ahead import Ahead, Loads
from nilus_dagster.sink.postgres_connection import PostgresConnection
from nilus_dagster.sink.postgres_facts import EXACT_COUNT_ROWS, count_rows
from nilus_dagster.sink.postgres_position import (
    lock_position,
    move_position,
    newest_timestamp_with,
)
from nilus_dagster.sink.postgres_types import (
    arrow_type,
    check_identifier,
    qualified,
    without_long_names,
)
from nilus_dagster.sink.rows import after_position
from nilus_dagster.sink.schema import METADATA_SCHEMA
from nilus_dagster.sink.writer import (
    STREAM_CREATED_KEY,
    CommitResult,
    PositionConflict,
    SinkState,
    SinkWriter,
    error_text,
)
from nilus_dagster.times import as_utc

logger = logging.getLogger("nilus_dagster.sink")

_NAME_FIX = "shorten it (PostgreSQL names hold 63 bytes)"


class PostgresSink(SinkWriter):
    """Writes decoded batches to one PostgreSQL table (and its dead-letter table), exactly once.

    Args:
        location: The database's connection parameters and ``schema.table``.
        app_id: The pipeline: its position row is keyed by it and the table.
        strategy: ``append``, ``merge`` on ``primary_key`` (a staging table and an upsert in
            which only a higher ``_nats_seq`` replaces a row) or ``replace`` (the first commit
            of a run empties the table in the same transaction that refills it).
        primary_key: Merge key columns (required for ``merge``).
        create_table: Create the table with the first commit; ``False`` makes a missing table
            an error.
    """

    kind: ClassVar[str] = "postgresql"

    def __init__(
        self,
        location: TableLocation,
        *,
        app_id: str,
        strategy: IncrementalStrategy = "append",
        primary_key: Sequence[str] | None = None,
        create_table: bool = True,
    ):
        super().__init__(
            location,
            app_id=app_id,
            strategy=strategy,
            primary_key=primary_key,
            create_table=create_table,
        )
        self.schema_name, _, self.table_name = location.table.partition(".")
        self.dead_table = self.table_name + DEAD_LETTER_SUFFIX
        # The manifest or depots file and field first, so every error says where to look.
        source = f"{location.options_source}: " if location.options_source else ""
        self._where = f"{source}PostgreSQL sink {location.uri}"
        check_identifier(self.schema_name, "the schema of dest_table", _NAME_FIX)
        check_identifier(
            self.dead_table,
            f"the dead-letter table of dest_table {location.table!r}",
            f"shorten the table name to {63 - len(DEAD_LETTER_SUFFIX)} bytes or fewer",
        )
        self._conn: PostgresConnection | None = None
        self._columns: dict[str, str] | None = None  # name -> type; None: no table yet
        self._dead_columns: dict[str, str] | None = None
        self._position = 0
        self._stream_created: str | None = None
        self._newest: datetime | None = None
        self._ahead: Ahead | None = None  # rows written ahead in the open transaction
        self._loads = Loads()

    # -- reading -------------------------------------------------------------------------------

    def open(self) -> SinkState:
        """Connect, check the database can take the rows, and read the committed position.

        Raises:
            SinkError: The server cannot be reached or refuses the user, is read-only, the
                schema is missing and may not be created, a privilege is missing, the table
                is missing with ``create_table`` false, or it has incompatible columns.
        """
        self.close()
        self._conn = catalog.connect(self.location.storage_options, self._where)
        try:
            self._check_and_read()
        except Exception:
            self.close()
            raise
        return self._opened_state(
            exists=self._columns is not None, stream_created=self._stream_created
        )

    def _check_and_read(self) -> None:
        assert self._conn is not None  # open() connected just before
        opened = checks.check_and_read(
            self._conn,
            schema=self.schema_name,
            table=self.table_name,
            dead_table=self.dead_table,
            app_id=self.app_id,
            strategy=self.strategy,
            primary_key=self.primary_key,
            create_table=self.create_table,
            where=self._where,
        )
        self._columns, self._dead_columns = opened.columns, opened.dead_columns
        self._position, self._stream_created = opened.position, opened.stream_created
        self._newest = opened.newest

    @property
    def position(self) -> int:
        """Last stream sequence committed (0 when none), as of :meth:`open` or the last commit."""
        return self._position

    def schema(self) -> pa.Schema | None:
        """The table's columns as Arrow, each with its PostgreSQL type in the field metadata."""
        if self._columns is None:
            return None
        return pa.schema(
            [
                pa.field(name, arrow_type(kind), metadata={"postgresql.type": kind})
                for name, kind in self._columns.items()
            ]
        )

    def conform_schema(self) -> pa.Schema | None:
        """The table's columns but its json(b) ones, which take any value."""
        # A json(b) column takes any value: rows keep what they decoded to and are written as
        # JSON text, so only the other columns are conformed (and can conflict).
        schema = self.schema()
        if schema is None:
            return None
        keep = [f for f in schema if f.metadata[b"postgresql.type"] not in (b"jsonb", b"json")]
        return pa.schema(keep)

    @classmethod
    def read_schema(cls, location: TableLocation) -> pa.Schema | None:
        """The table's columns from the catalog, ``None`` without a table or a connection."""
        schema_name, _, table = location.table.partition(".")
        try:
            conn = catalog.connect(location.storage_options, f"PostgreSQL sink {location.uri}")
        except SinkError as exc:
            logger.debug("no schema for %s: %s", location.uri, exc)
            return None
        try:
            columns = catalog.table_columns(conn, schema_name, table)
        finally:
            conn.close()
        if columns is None:
            return None
        return pa.schema(
            [
                pa.field(n, arrow_type(k), metadata={"postgresql.type": k})
                for n, k in columns.items()
            ]
        )

    def row_count(self) -> int:
        """Rows in the table (``count(*)``, which needs SELECT), 0 without a table."""
        return self._count(exact_up_to=None)[0] or 0

    def counted_rows(self) -> tuple[int | None, bool]:
        """Counted up to ``EXACT_COUNT_ROWS`` rows, PostgreSQL's estimate beyond.

        See :func:`~nilus_dagster.sink.postgres_facts.count_rows`: the estimate is the
        planner's (rows per page as last analyzed, times the pages now), a table that was
        never analyzed is counted, and a user without SELECT gets the estimate or nothing.
        """
        return self._count(exact_up_to=EXACT_COUNT_ROWS)

    def _count(self, *, exact_up_to: int | None) -> tuple[int | None, bool]:
        if self._columns is None:
            return 0, False
        conn = self._require_conn()
        self.discard_ahead()  # its commit ends the transaction: never with rows written ahead
        counted = count_rows(conn, self.schema_name, self.table_name, exact_up_to)
        conn.commit()
        return counted

    def newest_timestamp(self) -> datetime | None:
        """The newest ``_nats_timestamp`` committed, from the position row."""
        # Kept in the position row by every commit: no scan of the table.
        if self._newest is None:
            return None
        return as_utc(self._newest)

    # -- decoding ------------------------------------------------------------------------------

    def prepare(
        self,
        batch: MessageBatch,
        *,
        format: PayloadFormat = "json",
        decoder: BatchDecoder | None = None,
    ) -> Decoded:
        """Decode and conform ``batch``; fields with names over 63 bytes make dead letters."""
        decoded = super().prepare(batch, format=format, decoder=decoder)
        return without_long_names(decoded, batch)

    # -- writing -------------------------------------------------------------------------------

    def commit(
        self,
        rows: pa.Table | None,
        dead_letters: pa.Table | None,
        *,
        last_seq: int,
        overwrite: bool = False,
        commit_metadata: Mapping[str, str] | None = None,
    ) -> CommitResult:
        """Rows, dead letters and the position row in one transaction (see the class)."""
        conn = self._require_conn()
        if last_seq <= self._position:
            self.discard_ahead()
            raise SinkError(
                f"refusing to commit up to sequence {last_seq}: {self.location.uri} already "
                f"holds everything up to {self._position} (drop what is at or below the "
                "position before committing)"
            )
        if rows is None or rows.num_columns == 0:
            rows = METADATA_SCHEMA.empty_table()
        rows = after_position(rows, self._position)
        dead = after_position(dead_letters, self._position) if dead_letters is not None else None
        created = (commit_metadata or {}).get(STREAM_CREATED_KEY, self._stream_created)
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            ahead = Ahead(self._columns, self._dead_columns, self._newest)
        try:
            self._loads.wait()  # the last part written ahead (its failure fails the commit)
            newest = newest_timestamp_with(rows, ahead.newest)
            if ahead.last_seq > last_seq:
                raise SinkError(
                    f"rows up to sequence {ahead.last_seq} were written ahead of a commit up "
                    f"to {last_seq}: they belong to another chunk (rolled back)"
                )
            if not ahead.locked:
                self._lock_position()
            columns = self._ensure_table(self.table_name, rows, ahead.columns)
            if self.strategy == "merge":
                self._merge(rows, columns, "<")
            else:
                if self.strategy == "replace" and overwrite:
                    conn.execute(f"TRUNCATE {qualified(self.schema_name, self.table_name)}")
                self._load(self.table_name, rows, columns)
            dead_columns, dead_count = self._write_dead_letters(dead, ahead.dead_columns)
            move_position(
                self._conn,
                self.schema_name,
                self.app_id,
                self.table_name,
                last_seq=last_seq,
                created=created,
                newest=newest,
            )
            conn.commit()
        except PositionConflict:
            self._rollback()
            raise
        except Exception as exc:
            self._rollback()
            raise catalog.write_error(exc, f"{self._where}: cannot commit") from None
        self._columns, self._dead_columns = columns, dead_columns
        self._position, self._stream_created, self._newest = last_seq, created, newest
        return CommitResult(
            ahead.rows + rows.num_rows, ahead.dead_letters + dead_count, None, last_seq
        )

    def write_ahead(self, decoded: Decoded, *, last_seq: int) -> bool:
        """Load a part of the coming commit's rows into its transaction (``append`` only).

        The first part opens the transaction by locking the position row, exactly as the
        commit would (a concurrent writer waits there, and a moved position fails this part).
        Each part then loads in the sink's load thread while the caller decodes the next
        (``postgres_ahead``); the commit waits for it, adds its own rows and moves the
        position. ``merge`` upserts the chunk's latest row per key and ``replace`` empties the
        table first: both load at the commit.
        """
        if self.strategy != "append":
            return False
        self._require_conn()
        rows = after_position(decoded.rows, self._position)
        dead = after_position(decoded.dead_letters, self._position)
        ahead = self._ahead or Ahead(self._columns, self._dead_columns, self._newest)
        try:
            self._loads.wait()
            if not ahead.locked:
                self._lock_position()
                ahead.locked = True
                self._ahead = ahead
            if last_seq <= ahead.last_seq:
                raise SinkError(
                    f"a part ending at sequence {last_seq} is not after the rows written "
                    f"ahead (up to {ahead.last_seq})"
                )
            ahead.last_seq = last_seq
            self._loads.submit(self._load_ahead, ahead, rows, dead)
        except Exception as exc:
            self._ahead = ahead  # also roll back a lock taken before the first load
            self.discard_ahead()
            if isinstance(exc, SinkError):
                raise
            raise catalog.write_error(exc, f"{self._where}: cannot write") from None
        return True

    def _load_ahead(self, ahead: Ahead, rows: pa.Table, dead: pa.Table) -> None:
        """In the load thread: one part's rows and dead letters, into the open transaction."""
        ahead.columns = self._ensure_table(self.table_name, rows, ahead.columns)
        self._load(self.table_name, rows, ahead.columns)
        ahead.dead_columns, dead_count = self._write_dead_letters(dead, ahead.dead_columns)
        ahead.rows += rows.num_rows
        ahead.dead_letters += dead_count
        ahead.newest = newest_timestamp_with(rows, ahead.newest)

    def discard_ahead(self) -> None:
        """Roll back the transaction holding what :meth:`write_ahead` loaded."""
        if self._ahead is None:
            return
        self._ahead = None
        try:
            self._loads.wait()
        except Exception as exc:  # rolled back below in any case
            logger.debug("a load ahead into %s failed: %s", self.location.uri, error_text(exc))
        self._rollback()

    def _rollback(self) -> None:
        try:
            self._conn.rollback()
        except Exception as exc:  # a lost connection: the error being raised says so
            logger.debug("rolling back %s: %s", self.location.uri, error_text(exc))

    def replace_window(
        self,
        rows: pa.Table | None,
        dead_letters: pa.Table | None,
        *,
        start: datetime,
        end: datetime,
        up_to: int | None = None,
        commit_metadata: Mapping[str, str] | None = None,
    ) -> CommitResult:
        """Delete and reload (merge: upsert) the window's rows in one transaction.

        Only rows with ``_nats_seq <= up_to`` (default: the position) are replaced; rows after
        it belong to the writer that keeps appending (a service run).
        """
        conn = self._require_conn()
        self.discard_ahead()
        replay = self.replay_window(rows, dead_letters, start, end, up_to)
        rows, dead = replay.rows, replay.dead_letters
        start, end = replay.start, replay.end
        if self._columns is None and (rows is None or rows.num_rows == 0):
            return CommitResult(0, 0, None, self._position)
        rows = rows if rows is not None else METADATA_SCHEMA.empty_table()
        try:
            self._check_window_privileges(dead)
        except Exception as exc:  # a lost connection, say: classified like the replacement's
            raise catalog.write_error(exc, f"{self._where}: cannot replace the window") from None
        window = (
            f"_nats_timestamp >= $1 AND _nats_timestamp < $2 AND _nats_seq <= {int(replay.up_to)}"
        )
        try:
            self._lock_position()
            columns = self._ensure_table(self.table_name, rows, self._columns)
            if self.strategy == "merge":
                self._merge(rows, columns, "<=")
            else:
                target = qualified(self.schema_name, self.table_name)
                conn.execute(f"DELETE FROM {target} WHERE {window}", [start, end])
                self._load(self.table_name, rows, columns)
            dead_columns, dead_count = self._dead_columns, 0
            if dead is not None and dead.num_rows:
                if self._dead_columns is not None:
                    target = qualified(self.schema_name, self.dead_table)
                    conn.execute(f"DELETE FROM {target} WHERE {window}", [start, end])
                dead_columns, dead_count = self._write_dead_letters(dead, self._dead_columns)
            conn.commit()
        except PositionConflict:
            self._rollback()
            raise
        except Exception as exc:
            self._rollback()
            raise catalog.write_error(exc, f"{self._where}: cannot replace the window") from None
        self._columns, self._dead_columns = columns, dead_columns
        return CommitResult(rows.num_rows, dead_count, None, self._position)

    def _check_window_privileges(self, dead: pa.Table | None) -> None:
        """A window is replaced with ``DELETE`` (merge: an upsert), which appending never needs."""
        if self._columns is None or self.strategy == "merge":
            return
        tables = [self.table_name]
        if dead is not None and dead.num_rows and self._dead_columns is not None:
            tables.append(self.dead_table)
        checks.check_window_privileges(self._require_conn(), self.schema_name, tables, self._where)

    def close(self) -> None:
        """Close the connection (open() connects again); what was written ahead is dropped."""
        self._ahead = None
        self._loads.close()
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception as exc:  # closing a broken connection must not hide the real error
                logger.debug("closing %s: %s", self.location.uri, error_text(exc))
            self._conn = None
        self._opened = False

    # -- internals -----------------------------------------------------------------------------

    def _require_conn(self) -> PostgresConnection:
        if not self._opened or self._conn is None:
            raise SinkError("PostgresSink.open() must be called before writing")
        return self._conn

    def _lock_position(self) -> None:
        lock_position(
            self._conn,
            self.schema_name,
            self.app_id,
            self.table_name,
            expected=self._position,
            where=self.location.uri,
        )

    def _ensure_table(
        self, table: str, rows: pa.Table, columns: dict[str, str] | None
    ) -> dict[str, str]:
        key = self.primary_key if table == self.table_name and self.strategy == "merge" else ()
        return load.ensure_table(self._conn, self.schema_name, table, rows, columns, unique_key=key)

    def _load(self, table: str, rows: pa.Table, columns: Mapping[str, str]) -> None:
        load.load(self._conn, self.schema_name, table, rows, columns)

    def _merge(self, rows: pa.Table, columns: Mapping[str, str], newer: str) -> None:
        load.merge(
            self._conn, self.schema_name, self.table_name, rows, columns, self.primary_key, newer
        )

    def _write_dead_letters(
        self, dead: pa.Table | None, columns: dict[str, str] | None
    ) -> tuple[dict[str, str] | None, int]:
        if dead is None or dead.num_rows == 0:
            return columns, 0
        columns = self._ensure_table(self.dead_table, dead, columns)
        self._load(self.dead_table, dead, columns)
        return columns, dead.num_rows


__all__ = ["PostgresSink"]
