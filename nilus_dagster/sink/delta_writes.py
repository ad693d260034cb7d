"""Delta table mechanics: load, create, write, merge, predicates, and what a failure means.

Kept apart from :mod:`nilus_dagster.sink.delta` so the sink holds the exactly-once protocol
(which snapshot, which position) and this module the mechanics of one write.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Literal

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.redaction import redact
from nilus_dagster.sink.delta_append import AppendConflict
from nilus_dagster.sink.rows import latest_per_key
from nilus_dagster.sink.storage_errors import storage_error
from nilus_dagster.sink.writer import PositionConflict, error_text


def load_table(
    uri: str, storage_options: Mapping[str, str] | None, location: TableLocation
) -> DeltaTable | None:
    """The table at ``uri``, or ``None`` when there is none.

    Raises:
        SinkError: It cannot be read (what to check is named; secrets are redacted).
    """
    try:
        return DeltaTable(uri, storage_options=dict(storage_options or {}) or None)
    except TableNotFoundError:
        return None
    except Exception as exc:
        explained = storage_error(f"cannot open Delta table {redact(uri)}", exc, location)
        if explained:
            raise explained from None
        raise SinkError(
            f"cannot open Delta table {redact(uri)}: {error_text(exc)}. Check the storage "
            "root and its storage options (credentials, region, endpoint)"
        ) from None


def create_empty_table(
    uri: str,
    schema: pa.Schema,
    *,
    partition_by: Sequence[str],
    configuration: Mapping[str, str] | None,
    storage_options: Mapping[str, str] | None,
) -> DeltaTable:
    """Create the table with ``schema`` and no rows (nothing when it exists); return it."""
    options = dict(storage_options or {}) or None
    write_deltalake(
        uri,
        schema.empty_table(),
        mode="ignore",
        partition_by=list(partition_by) or None,
        configuration=dict(configuration) if configuration else None,
        storage_options=options,
    )
    return DeltaTable(uri, storage_options=options)


def write_error(exc: Exception, action: str, location: TableLocation) -> SinkError:
    """What a failed write to the table at ``location`` means for the writer.

    deltalake 1.6.6 raised ``CommitFailedError`` for every lost race measured (racing writers,
    local table): a concurrent txn, data or overwrite, metadata or protocol changed by a racing
    create, a taken commit version retried until out of attempts. Those, and a direct append's
    conflict, are a :class:`PositionConflict`.
    """
    uri, text = location.uri, error_text(exc)
    if isinstance(exc, (CommitFailedError, AppendConflict)):
        return PositionConflict(
            f"another writer committed to {redact(uri)} since it was opened ({text}); "
            "open() again to read the current position"
        )
    if isinstance(exc, SinkError):
        return exc
    explained = storage_error(f"cannot {action} Delta table {redact(uri)}", exc, location)
    return explained or SinkError(f"cannot {action} Delta table {redact(uri)}: {text}")


def window_predicate(start: datetime, end: datetime, up_to: int) -> str:
    """The rows a window replay replaces: stamped in ``[start, end)``, at or below ``up_to``."""
    return (
        f"`_nats_timestamp` >= '{timestamp_literal(start)}' "
        f"AND `_nats_timestamp` < '{timestamp_literal(end)}' AND `_nats_seq` <= {int(up_to)}"
    )


def commit_properties(
    app_id: str, version: int | None, metadata: Mapping[str, str]
) -> CommitProperties:
    """Commit properties carrying ``metadata`` and, when ``version`` is set, the app's txn."""
    txn = [Transaction(app_id, version)] if version is not None else None
    return CommitProperties(custom_metadata=dict(metadata) or None, app_transactions=txn)


def write_rows(
    table: DeltaTable,
    rows: pa.Table,
    mode: Literal["append", "overwrite"],
    properties: CommitProperties,
    predicate: str | None = None,
) -> None:
    """Append ``rows`` to, or overwrite (``predicate``: only matching rows of) ``table``."""
    rows = one_chunk_layout(rows)
    if mode == "append":
        write_deltalake(
            table, rows, mode="append", schema_mode="merge", commit_properties=properties
        )
    else:
        write_deltalake(
            table,
            rows,
            mode="overwrite",
            predicate=predicate,
            schema_mode="merge",
            commit_properties=properties,
        )


def merge_rows(
    table: DeltaTable,
    rows: pa.Table,
    primary_key: Sequence[str],
    properties: CommitProperties,
    *,
    when: str,
    commit: bool = True,
) -> None:
    """Upsert the newest row per key of ``rows`` into ``table``, replacing rows matching ``when``.

    Args:
        table: The snapshot to merge through (``t`` in ``when``; the rows are ``s``).
        rows: Rows to merge.
        primary_key: The key columns.
        properties: The commit's properties (the position's txn among them).
        when: The condition under which a source row replaces a matched target row.
        commit: Commit even when the merge changes nothing, so that the position moves.
    """
    before = table.version()
    target = set(table.schema().to_arrow().names)
    if rows.num_rows and not set(primary_key) <= target:
        # No table row has a key yet, so nothing can match: insert (merge would fail to
        # resolve the key column on the target side).
        write_rows(table, latest_per_key(rows, primary_key), "append", properties)
    elif rows.num_rows:
        source = one_chunk_layout(latest_per_key(rows, primary_key))
        on = " AND ".join(f"t.{quote_column(k)} = s.{quote_column(k)}" for k in primary_key)
        (
            table.merge(
                source,
                on,
                source_alias="s",
                target_alias="t",
                merge_schema=True,
                commit_properties=properties,
            )
            .when_matched_update_all(predicate=when)
            .when_not_matched_insert_all()
            .execute()
        )
    if commit and table.version() == before:
        # A merge that changes nothing commits nothing (measured), so the position would not
        # move: commit it with an empty append through the same snapshot.
        write_rows(table, rows.slice(0, 0), "append", properties)


def one_chunk_layout(rows: pa.Table) -> pa.Table:
    """``rows`` with every column chunked alike (combined when they differ).

    Columns chunked differently reach deltalake as record batches that slice some columns;
    deltalake 1.6.6 (arrow-rs 59) panics on a sliced struct nested in a struct and aborts the
    process (measured: a >4 MB batch, read by Arrow in two blocks, padded with a single-chunk
    null column for a table's nested struct column missing from the batch).
    """
    layouts = {tuple(len(chunk) for chunk in column.chunks) for column in rows.columns}
    return rows if len(layouts) <= 1 else rows.combine_chunks()


def quote_column(name: str) -> str:
    """``name`` as a backtick-quoted column of a Delta SQL predicate."""
    return "`" + name.replace("`", "``") + "`"


def timestamp_literal(moment: datetime) -> str:
    """``moment`` (UTC) as a timestamp literal of a Delta SQL predicate."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
