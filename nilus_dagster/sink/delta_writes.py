"""Writing Arrow rows through a Delta snapshot: commit properties, chunk layout, SQL literals.

Kept apart from :mod:`nilus_dagster.sink.delta` so the sink holds the exactly-once protocol
(which snapshot, which position) and this module the mechanics of one write.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Literal

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from nilus_dagster.sink.rows import latest_per_key


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
