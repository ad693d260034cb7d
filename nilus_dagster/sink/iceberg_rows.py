"""Rows and schemas as an Iceberg table takes them, and facts read from its metadata.

Storable types, schema growth and merge plans.
"""

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.conversions import from_bytes
from pyiceberg.expressions import BooleanExpression
from pyiceberg.table import Table, Transaction
from pyiceberg.table.upsert_util import create_match_filter
from pyiceberg.types import TimestamptzType

from nilus_dagster.sink import iceberg_catalog as cat
from nilus_dagster.sink.rows import latest_per_key
from nilus_dagster.times import as_utc


def merge_plan(
    table: Table, rows: pa.Table, keys: Sequence[str], replace_equal: bool
) -> tuple[pa.Table, BooleanExpression | None]:
    """What a merge of ``rows`` on ``keys`` writes.

    The rows to add, and the filter of the table rows they replace (``None``: nothing is
    replaced).

    Only the latest message per key counts, and it replaces a table row only when its
    ``_nats_seq`` is higher (or equal, ``replace_equal``, for a window replay); rows with a
    null key never match.
    """
    keys = list(keys)
    source = latest_per_key(rows, keys) if rows.num_rows else rows
    if not source.num_rows or table.current_snapshot() is None:
        return source, None
    if not set(keys) <= set(table.schema().column_names):
        return source, None  # no table row has a key yet
    keyed = source.filter(_has_keys(source, keys))
    if not keyed.num_rows:
        return source, None
    existing = table.scan(
        row_filter=create_match_filter(keyed, keys), selected_fields=(*keys, "_nats_seq")
    ).to_arrow()
    if not existing.num_rows:
        return source, None
    source, replaced = _newer_than(source, existing, keys, replace_equal)
    return source, create_match_filter(replaced, keys) if replaced.num_rows else None


def missing_properties(table: Table) -> bool:
    """Whether ``table`` lacks a property the sink relies on (its commit retry switched off)."""
    return any(table.properties.get(k) != v for k, v in cat.REQUIRED_PROPERTIES.items())


def storable(rows: pa.Table, table_schema: pa.Schema | None) -> pa.Table:
    """``rows`` as Iceberg can store them.

    ``_nats_seq`` as long (Iceberg has no unsigned types), and new columns without a type yet
    (lists of nulls only) left out until a value gives them one; they read as null.
    """
    known = set(table_schema.names) if table_schema is not None else set()
    drop = [f.name for f in rows.schema if f.name not in known and _untyped(f.type)]
    if drop:
        rows = rows.drop_columns(drop)
    index = rows.schema.get_field_index("_nats_seq")
    if index >= 0 and not pa.types.is_int64(rows.schema.field(index).type):
        rows = rows.set_column(index, "_nats_seq", rows.column(index).cast(pa.int64()))
    return rows


def _untyped(dtype: pa.DataType) -> bool:
    if pa.types.is_null(dtype):
        return True
    if pa.types.is_struct(dtype):
        return any(_untyped(f.type) for f in dtype)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _untyped(dtype.value_type)
    if pa.types.is_map(dtype):
        return _untyped(dtype.key_type) or _untyped(dtype.item_type)
    return False


def evolve(txn: Transaction, table: Table, rows: pa.Table) -> None:
    """Add ``rows``' new fields to the table's schema, by name, in the same transaction."""
    current = cat.arrow_schema(table.schema())
    existing = {f.name: f.type for f in current}
    if all(existing.get(f.name) == f.type for f in rows.schema if f.name != "_nats_seq"):
        return
    with txn.update_schema() as update:
        update.union_by_name(rows.schema)


def _has_keys(rows: pa.Table, keys: Sequence[str]) -> pa.ChunkedArray:
    mask = pc.is_valid(rows.column(keys[0]))
    for key in keys[1:]:
        mask = pc.and_(mask, pc.is_valid(rows.column(key)))
    return mask


def _newer_than(
    source: pa.Table, existing: pa.Table, keys: Sequence[str], replace_equal: bool
) -> tuple[pa.Table, pa.Table]:
    """Split ``source`` against the table rows with the same keys.

    Returns:
        ``(to_write, replaced)``: source rows that are new or newer than the table's row
        (the table's row is replaced), and the keys of the table rows they replace.
    """
    numbered = source.append_column("__row", pa.array(range(source.num_rows), pa.int64()))
    table_seq = existing.select([*keys, "_nats_seq"]).rename_columns([*keys, "__table_seq"])
    joined = numbered.select([*keys, "_nats_seq", "__row"]).join(
        table_seq, keys=list(keys), join_type="left outer", use_threads=False
    )
    seq = joined.column("_nats_seq").cast(pa.int64())
    table_seq_col = joined.column("__table_seq").cast(pa.int64())
    newer = (
        pc.greater_equal(seq, table_seq_col) if replace_equal else pc.greater(seq, table_seq_col)
    )
    absent = pc.is_null(table_seq_col)
    keep = pc.or_(absent, pc.fill_null(newer, False))
    rows = joined.filter(keep).column("__row")
    replaced = joined.filter(pc.and_(pc.invert(absent), pc.fill_null(newer, False)))
    order = pc.sort_indices(rows)
    to_write = source.take(rows.take(order))
    return to_write, replaced.select(list(keys))


def newest_timestamp(table: Table) -> datetime | None:
    """The newest ``_nats_timestamp`` in ``table``, from its data files' column bounds.

    The column is read only when a file has none.
    """
    if table.current_snapshot() is None:
        return None
    field_id = table.schema().find_field("_nats_timestamp").field_id
    newest: int | None = None
    for task in table.scan().plan_files():
        bound = (task.file.upper_bounds or {}).get(field_id)
        if bound is None:
            column = table.scan(selected_fields=("_nats_timestamp",)).to_arrow()
            value = pc.max(column.column(0)).as_py()
            return as_utc(value) if value is not None else None
        micros = from_bytes(TimestamptzType(), bound)
        newest = micros if newest is None else max(newest, micros)
    if newest is None:
        return None
    return datetime.fromtimestamp(newest / 1e6, tz=timezone.utc)


@contextlib.contextmanager
def quiet_overwrites() -> Iterator[None]:
    """Silence pyiceberg's warning that an overwrite's filter matched nothing.

    That is normal here (an empty window or table), not worth a warning per commit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Delete operation did not match", UserWarning)
        yield
