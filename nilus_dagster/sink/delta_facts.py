"""Facts about a Delta table read from its log and statistics, not its data.

Its schema, its newest row's timestamp and the stream creation time its commits carry.
"""

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.redaction import redact
from nilus_dagster.sink.writer import STREAM_CREATED_KEY

logger = logging.getLogger("nilus_dagster.sink")

_HISTORY_SCAN = 20  # recent commits searched first for the stream's creation time


def read_delta_schema(location: TableLocation) -> pa.Schema | None:
    """The Delta table's schema from its log only (no data files), ``None`` without one."""
    options = {str(k): str(v) for k, v in location.storage_options.items()} or None
    try:
        if not DeltaTable.is_deltatable(location.uri, options):
            return None
        return pa.schema(DeltaTable(location.uri, storage_options=options).schema().to_arrow())
    except (DeltaError, OSError, ValueError) as exc:
        logger.debug("no schema for %s: %s", redact(location.uri), type(exc).__name__)
        return None


def newest_timestamp(table: DeltaTable) -> datetime | None:
    """The newest ``_nats_timestamp`` in ``table`` (from file statistics when present)."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return None
    column = "max._nats_timestamp"
    if column in actions.column_names and actions.column(column).null_count == 0:
        newest = pc.max(actions.column(column)).as_py()
    else:
        # No statistics for some file: read just that column.
        data = table.to_pyarrow_dataset().to_table(columns=["_nats_timestamp"])
        newest = pc.max(data.column(0)).as_py()
    if newest is None:
        return None
    if isinstance(newest, datetime) and newest.tzinfo is None:
        newest = newest.replace(tzinfo=timezone.utc)
    return newest.astimezone(timezone.utc)


def find_stream_created(table: DeltaTable) -> str | None:
    """The stream's creation time as the newest commit that carries it recorded it.

    Every commit carries it forward, so the recent commits answer without a full history
    scan; the whole history is read only when none of them has it.
    """
    history = table.history(_HISTORY_SCAN)
    if len(history) == _HISTORY_SCAN:
        found = _created_in(history)
        if found is not None:
            return found
        history = table.history()
    return _created_in(history)


def _created_in(history: Sequence[Mapping[str, object]]) -> str | None:
    for entry in history:  # newest first
        value = entry.get(STREAM_CREATED_KEY)
        if value is not None:
            return str(value)
    return None
