"""One PostgreSQL connection through ADBC's low-level API (not its DB-API module).

``adbc_driver_postgresql.dbapi`` imports ``pyarrow.dataset`` and, when they are installed,
pandas and polars: about 0.4 s of CPU at the start of a run that needs none of them. The sink
needs little of the DB-API: statements with ``$n`` parameters, small results, whole results as
Arrow, a bulk load, commit and rollback. :class:`PostgresConnection` does each with an
``AdbcStatement`` of its own, closed before it returns.

The driver releases the GIL in every call that waits on the server (``execute_update`` of a
bulk load included), so a load in another thread overlaps with the caller's Python work.
Results are read with ADBC's own reader where the installed release has it (an error in the
middle of a result stream then arrives as the ADBC error it is, with its SQLSTATE, as through
the DB-API module); otherwise with pyarrow's public import, where such an error is pyarrow's.
Unlike the DB-API module, a SIGINT does not cancel a statement blocking the main thread (the
engine runs the sink in worker threads, where the DB-API module does not either).
"""

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import adbc_driver_manager
import adbc_driver_postgresql
import pyarrow as pa

_TEMPORARY = adbc_driver_manager.StatementOptions.INGEST_TEMPORARY.value
_TARGET_SCHEMA = adbc_driver_manager.StatementOptions.INGEST_TARGET_DB_SCHEMA.value

COPY_BATCH_BYTES = 256 * 1024
"""About how much of a bulk load the driver encodes at a time.

The driver encodes a whole record batch before sending it, and the server parses it only
then; a decoded part is one batch of 16,384 rows. Sent in batches of this size, the server
parses one while the driver encodes the next: 16,384 orders loaded in about 50 ms instead of
68 ms here, with the same CPU (from 56 KB to 460 KB batches did equally well)."""


class PostgresConnection:
    """A connection with autocommit off: every statement joins the open transaction.

    Args:
        uri: A libpq connection URI (``postgresql://user@host:port/db?connect_timeout=10``).

    Raises:
        adbc_driver_manager.Error: The server cannot be reached or refuses the connection.
    """

    def __init__(self, uri: str) -> None:
        database = adbc_driver_postgresql.connect(uri)
        try:
            connection = adbc_driver_manager.AdbcConnection(database)
            try:
                connection.set_autocommit(False)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            database.close()
            raise
        self._database = database
        self._connection = connection
        self._closed = False

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows ``sql`` returns, each a tuple of Python values (``$1``-style parameters)."""
        table = self.read_arrow(sql, params)
        return list(zip(*(column.to_pylist() for column in table.columns), strict=True))

    def read_arrow(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        """What ``sql`` returns, as an Arrow table (``$1``-style parameters)."""
        with self._statement(sql, params) as statement:
            handle, _ = statement.execute_query()
            reader = _result_reader(handle)  # takes the stream over (released with the reader)
            try:
                return reader.read_all()
            finally:
                reader.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run a statement that returns nothing (``$1``-style parameters)."""
        with self._statement(sql, params) as statement:
            statement.execute_update()

    def bulk_load(
        self, table: str, rows: pa.Table, *, schema: str | None = None, temporary: bool = False
    ) -> None:
        """Append ``rows`` to an existing table: the driver's binary ``COPY``.

        Args:
            table: The table, its columns matching ``rows``' names and types.
            rows: The rows to load.
            schema: The table's schema (``None``: the search path).
            temporary: The table is a temporary one (no schema then).
        """
        options = {
            adbc_driver_manager.INGEST_OPTION_TARGET_TABLE: table,
            adbc_driver_manager.INGEST_OPTION_MODE: adbc_driver_manager.INGEST_OPTION_MODE_APPEND,
        }
        if schema is not None:
            options[_TARGET_SCHEMA] = schema
        with adbc_driver_manager.AdbcStatement(self._connection) as statement:
            statement.set_options(**options)
            if temporary:
                statement.set_options(**{_TEMPORARY: "true"})
            else:
                # Cleared explicitly, as the DB-API module does; not every driver has it.
                with contextlib.suppress(adbc_driver_manager.NotSupportedError):
                    statement.set_options(**{_TEMPORARY: "false"})
            statement.bind_stream(copy_batches(rows))
            statement.execute_update()

    def commit(self) -> None:
        """Commit the open transaction (the next statement begins another)."""
        self._connection.commit()

    def rollback(self) -> None:
        """Roll back the open transaction."""
        self._connection.rollback()

    def close(self) -> None:
        """Close the connection (an open transaction is rolled back by the server)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._connection.close()
        finally:
            self._database.close()

    def _statement(self, sql: str, params: Sequence[Any]) -> adbc_driver_manager.AdbcStatement:
        """A statement holding ``sql``, prepared, with ``params`` bound as one row."""
        statement = adbc_driver_manager.AdbcStatement(self._connection)
        try:
            statement.set_sql_query(sql)
            with contextlib.suppress(adbc_driver_manager.NotSupportedError):
                statement.prepare()
            if params:
                statement.bind(
                    pa.record_batch(
                        [[value] for value in params], names=[str(i) for i in range(len(params))]
                    )
                )
        except BaseException:
            statement.close()
            raise
        return statement


def _result_reader(handle: adbc_driver_manager.ArrowArrayStreamHandle) -> pa.RecordBatchReader:
    """A reader taking the result stream ``handle`` over."""
    adbc_import = adbc_reader_import()
    if adbc_import is not None:
        return adbc_import(handle.address)
    return pa.RecordBatchReader.from_stream(handle)


@functools.cache
def adbc_reader_import() -> Callable[[int], pa.RecordBatchReader] | None:
    """ADBC's reader import (private API), ``None`` where the installed release lacks it.

    It is what the DB-API module reads results with: an error in the middle of the stream (a
    ``COPY`` that fails after it began, such as a lock timeout) is raised as the ADBC error
    with its SQLSTATE, which :func:`~nilus_dagster.sink.postgres_catalog.write_error` reads.
    """
    try:
        from adbc_driver_manager._reader import AdbcRecordBatchReader
    except ImportError:
        return None
    found = getattr(AdbcRecordBatchReader, "_import_from_c", None)
    return found if callable(found) else None


def copy_batches(rows: pa.Table, batch_bytes: int | None = None) -> pa.Table:
    """``rows`` in record batches of about ``batch_bytes`` each (slices: nothing is copied).

    Args:
        rows: The rows of a bulk load.
        batch_bytes: About how large each batch is; :data:`COPY_BATCH_BYTES` by default.

    Returns:
        The same rows in the same order, as ``rows`` itself when its batches are small enough.
    """
    if rows.num_rows == 0:
        return rows
    size = COPY_BATCH_BYTES if batch_bytes is None else batch_bytes
    batch_rows = max(1, size * rows.num_rows // max(1, rows.nbytes))
    if all(len(batch) <= batch_rows for batch in rows.to_batches()):
        return rows
    return pa.Table.from_batches(rows.to_batches(max_chunksize=batch_rows), rows.schema)
