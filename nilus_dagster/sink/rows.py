"""Row operations every sink writer shares: past the position, in a window, latest per key."""

from collections.abc import Sequence
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from nilus_dagster.errors import SinkError
from nilus_dagster.sink.schema import TIMESTAMP_TYPE


def latest_per_key(rows: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Keep, for each key, only the row of the latest message (highest ``_nats_seq``).

    Rows with a null key never match a table row, so they are all kept.
    """
    missing = [k for k in keys if k not in rows.column_names]
    if missing:
        raise SinkError(
            f"primary_key column(s) {missing} are not in the rows: every message of a merge "
            "pipeline must carry its key fields"
        )
    seq = rows.column("_nats_seq")
    order = pc.sort_indices(seq)  # stable; batches arrive sorted, so this is usually identity
    rows = rows.take(order)
    numbered = rows.select(list(keys)).append_column(
        "__row", pa.array(range(rows.num_rows), pa.int64())
    )
    null_key = pc.is_null(numbered.column(keys[0]))
    for key in keys[1:]:
        null_key = pc.or_(null_key, pc.is_null(numbered.column(key)))
    keyed = numbered.filter(pc.invert(null_key))
    latest = keyed.group_by(list(keys), use_threads=False).aggregate([("__row", "max")])
    if latest.num_rows == rows.num_rows:
        return rows
    keep = pa.concat_arrays(
        [
            latest.column("__row_max").combine_chunks(),
            numbered.filter(null_key).column("__row").combine_chunks(),
        ]
    )
    return rows.take(keep.take(pc.sort_indices(keep)))


def after_position(table: pa.Table, position: int) -> pa.Table:
    """The rows past ``position`` (the rest were committed already)."""
    if table.num_rows == 0 or position <= 0 or "_nats_seq" not in table.column_names:
        return table
    seq = table.column("_nats_seq")
    if pc.min(seq).as_py() > position:
        return table
    return table.filter(pc.greater(seq.cast(pa.int64()), position))


def up_to_position(table: pa.Table | None, position: int) -> pa.Table | None:
    """The rows at or below ``position`` (what a window replay may write)."""
    if table is None or table.num_rows == 0:
        return table
    return table.filter(pc.less_equal(table.column("_nats_seq").cast(pa.int64()), position))


def in_window(table: pa.Table | None, start: datetime, end: datetime) -> pa.Table | None:
    """The rows whose ``_nats_timestamp`` is in ``[start, end)``."""
    if table is None or table.num_rows == 0:
        return table
    ts = table.column("_nats_timestamp").cast(TIMESTAMP_TYPE)
    lo = pa.scalar(start, TIMESTAMP_TYPE)
    hi = pa.scalar(end, TIMESTAMP_TYPE)
    return table.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))
