"""Facts about a Delta table read from its log and statistics, not its data: schema, newest row."""

import logging
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.redaction import redact

logger = logging.getLogger("nilus_dagster.sink")


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
