"""Reading a pipeline's table back, per kind of sink, for downstream assets.

Each kind of table store a pipeline can write to is a :class:`SinkKind`: the name Dagster's UI
knows it by (its kind icon) and a reader that returns the table, or one event-time window of
it, as Arrow. Delta Lake is registered here; a sink added later registers its own kind with
:func:`register_sink_kind`, and tells its tables apart by ``TableLocation.kind`` (a location
without a ``kind`` is a Delta table). The IO manager and the translator only dispatch.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa

from nilus_dagster.errors import NilusError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.manifest.loader import Pipeline

TIMESTAMP_COLUMN = "_nats_timestamp"
DELTA = "delta"

Window = tuple[datetime, datetime]
TableReader = Callable[[TableLocation, Window | None], pa.Table]


@dataclass(frozen=True)
class SinkKind:
    """One kind of table store.

    Args:
        name: The sink's own name (``delta``); what ``TableLocation.kind`` says.
        dagster_kind: The asset kind shown in Dagster (``deltalake``: the UI has its icon).
        label: How descriptions name the table (``Delta``).
        read: ``read(location, window)``: the whole table when ``window`` is ``None``, else
            the rows whose ``_nats_timestamp`` is in ``[start, end)``.
    """

    name: str
    dagster_kind: str
    label: str
    read: TableReader


_KINDS: dict[str, SinkKind] = {}


def register_sink_kind(kind: SinkKind) -> None:
    """Make a sink's tables readable by downstream assets (and named in Dagster)."""
    _KINDS[kind.name] = kind


def location_kind(location: TableLocation | None) -> SinkKind:
    """The kind of the table at ``location``.

    Raises:
        NilusError: No reader is registered for the location's kind.
    """
    name = getattr(location, "kind", None) or DELTA
    kind = _KINDS.get(name)
    if kind is None:
        raise NilusError(
            f"no reader for {name} tables is registered (known: {', '.join(sorted(_KINDS))}); "
            "install the sink's package or read the table with its own client"
        )
    return kind


def sink_kind(pipeline: Pipeline) -> SinkKind:
    """The kind of the pipeline's table, without reading any secret or storage."""
    try:
        location: TableLocation | None = pipeline.table_location(fill_secrets=False)
    except NilusError:
        location = None  # e.g. a depot missing from the depots file; the run reports it
    try:
        return location_kind(location)
    except NilusError:
        return _KINDS[DELTA]


def read_delta(location: TableLocation, window: Window | None) -> pa.Table:
    """A Delta table (or one window of it) as Arrow; only the window's files are scanned."""
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    table = DeltaTable(location.uri, storage_options=dict(location.storage_options) or None)
    dataset = table.to_pyarrow_dataset()
    if window is None:
        return dataset.to_table()
    column_type = dataset.schema.field(TIMESTAMP_COLUMN).type
    start, end = (pa.scalar(bound, type=column_type) for bound in window)
    column = ds.field(TIMESTAMP_COLUMN)
    return dataset.to_table(filter=(column >= start) & (column < end))


def read_postgres(location: TableLocation, window: Window | None) -> pa.Table:
    """A PostgreSQL table (or one window of it) as Arrow, in one query."""
    from nilus_dagster.sink.postgres_catalog import read_table

    schema, _, table = location.table.partition(".")
    return read_table(
        location.storage_options, schema, table, window, f"PostgreSQL table {location.uri}"
    )


def read_iceberg(location: TableLocation, window: Window | None) -> pa.Table:
    """An Iceberg table (or one window of it) as Arrow, scanned through its catalog."""
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    from nilus_dagster.sink.iceberg_catalog import connect, identifier, load_table

    table = load_table(connect(location), identifier(location))
    if table is None:
        raise NilusError(f"the Iceberg table {location.table} does not exist yet: materialize it")
    if window is None:
        return table.scan().to_arrow()
    start, end = (bound.isoformat() for bound in window)
    row_filter = And(GreaterThanOrEqual(TIMESTAMP_COLUMN, start), LessThan(TIMESTAMP_COLUMN, end))
    return table.scan(row_filter=row_filter).to_arrow()


register_sink_kind(SinkKind(name=DELTA, dagster_kind="deltalake", label="Delta", read=read_delta))
register_sink_kind(
    SinkKind(name="iceberg", dagster_kind="iceberg", label="Iceberg", read=read_iceberg)
)
register_sink_kind(
    SinkKind(name="postgresql", dagster_kind="postgres", label="PostgreSQL", read=read_postgres)
)
