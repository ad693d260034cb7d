"""Metadata values: run figures, lag observations, static asset facts and the column schema.

Every value that could carry an address goes through the manifest's ``redacted()`` or
:func:`~nilus_dagster.redaction.redact`; secrets never reach Dagster's event log.
"""

import logging
from collections.abc import Mapping
from typing import Any

import dagster as dg

from nilus_dagster.dagster.constants import META_POSITION
from nilus_dagster.engine import LagReport, RunReport
from nilus_dagster.manifest.depots import TableLocation

logger = logging.getLogger("nilus_dagster.dagster")

_TEXT_KEYS = frozenset({"nats/stream", "nats/subject"})
_PATH_KEYS = frozenset({"nilus/table_uri"})
_FLOAT_KEYS = frozenset({"nats/lag_seconds", "nilus/messages_per_second", "nilus/duration_seconds"})


def typed_metadata(values: Mapping[str, Any]) -> dict[str, dg.MetadataValue]:
    """Plain values under the design's keys -> Dagster metadata values of the right kind."""
    out: dict[str, dg.MetadataValue] = {}
    for key, value in values.items():
        if value is None:
            out[key] = dg.MetadataValue.null()
        elif key in _TEXT_KEYS:
            out[key] = dg.MetadataValue.text(str(value))
        elif key in _PATH_KEYS:
            out[key] = dg.MetadataValue.path(str(value))
        elif key in _FLOAT_KEYS or isinstance(value, float):
            out[key] = dg.MetadataValue.float(float(value))
        elif isinstance(value, bool):
            out[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            out[key] = dg.MetadataValue.int(value)
        else:
            out[key] = dg.MetadataValue.text(str(value))
    return out


def run_metadata(report: RunReport) -> dict[str, dg.MetadataValue]:
    """The run metadata the design fixes, typed (``RunReport.metadata()`` is the source)."""
    return typed_metadata(report.metadata())


def lag_metadata(lag: LagReport) -> dict[str, dg.MetadataValue]:
    """What a sensor tick records as an observation: the lag figures and the position."""
    values: dict[str, Any] = {
        "nats/stream": lag.stream,
        "nats/subject": lag.subject,
        "nats/sequence_lag": lag.sequence_lag,
        "nats/stream_first_seq": lag.stream_first_seq,
        "nats/stream_last_seq": lag.stream_last_seq,
        "nats/gap": lag.gap,
        META_POSITION: lag.position,
        "nilus/table_uri": lag.table_uri,
    }
    # An empty table has no newest message: leave the point out rather than chart a fake 0.
    if lag.lag_seconds is not None:
        values["nats/lag_seconds"] = float(lag.lag_seconds)
    return typed_metadata(values)


def column_schema(location: TableLocation) -> dg.TableSchema | None:
    """The table's columns, or ``None`` when there is no table (yet) or it cannot be read.

    The sink writer reads only what describes the table (a Delta log, a database catalog).
    """
    from nilus_dagster.sink import read_table_schema

    schema = read_table_schema(location)
    if schema is None:
        return None
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=f.name,
                # A database's own type name where the writer gives one (PostgreSQL's jsonb).
                type=(f.metadata or {}).get(b"postgresql.type", str(f.type).encode()).decode(),
                constraints=dg.TableColumnConstraints(nullable=f.nullable),
            )
            for f in schema
        ]
    )
