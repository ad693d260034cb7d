"""Which writer serves a table: chosen from the resolved location's kind (the depot ``type``).

Writers are imported only when used, so a store's client library is needed only by the
deployments that write to that store (``pip install "nilus-dagster[postgres]"``...).
"""

import importlib
from typing import TYPE_CHECKING

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.sink.writer import SinkWriter

if TYPE_CHECKING:
    import pyarrow as pa

    from nilus_dagster.manifest.model import SinkOptions

WRITERS: dict[str, tuple[str, str, str]] = {
    "delta": ("nilus_dagster.sink.delta", "DeltaSink", ""),
    "postgresql": ("nilus_dagster.sink.postgres", "PostgresSink", "postgres"),
    "iceberg": ("nilus_dagster.sink.iceberg", "IcebergSink", "iceberg"),
}
"""Location kind -> (module, class, the extra that installs its client library)."""


def writer_class(kind: str) -> type[SinkWriter]:
    """The writer class for a location kind.

    Raises:
        SinkError: No writer serves ``kind``, or its client library is not installed.
    """
    entry = WRITERS.get(kind)
    if entry is None:
        raise SinkError(
            f"no sink writer for depot type {kind!r}; the types are: {', '.join(sorted(WRITERS))}"
        )
    module_name, class_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SinkError(
            f"the {kind} sink needs {exc.name or 'its client library'}: "
            f'pip install "nilus-dagster[{extra or kind}]"'
        ) from None
    return getattr(module, class_name)


def sink_writer(location: TableLocation, options: "SinkOptions", *, app_id: str) -> SinkWriter:
    """The writer for ``location`` with the manifest's sink options (not opened yet).

    Raises:
        SinkError: No writer serves the location, or the options do not suit it.
    """
    return writer_class(location.kind).from_options(location, options, app_id=app_id)


def read_table_schema(location: TableLocation) -> "pa.Schema | None":
    """The schema of the table at ``location``, ``None`` when there is none or it is unreadable.

    For the asset's column schema: never raises for a table that is merely missing.
    """
    try:
        cls = writer_class(location.kind)
    except SinkError:
        return None
    return cls.read_schema(location)
