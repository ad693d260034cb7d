"""The IO manager that hands a pipeline's table to downstream assets.

The pipeline's run has already committed its rows (with the stream position) when its asset
materializes, so :meth:`NilusTableIOManager.handle_output` writes nothing. Its
:meth:`~NilusTableIOManager.load_input` reads the table through the reader of the table's kind
(:mod:`nilus_dagster.dagster.readers`): a partitioned downstream asset gets exactly the rows of
its window (``_nats_timestamp`` in ``[start, end)``), any other the whole table. The value is
Arrow, or a polars / pandas DataFrame when the input is annotated so.

dagster-deltalake's IO manager was considered: it pins one Dagster release per version and
names tables after asset keys under one root, while a Nilus table lives where its manifest and
depot say and may be in another store; so this reads only, and defers to the sink's reader.
"""

from typing import Any

import dagster as dg
import pyarrow as pa
from pydantic import Field

from nilus_dagster.dagster.constants import META_MANIFEST
from nilus_dagster.dagster.readers import Window, location_kind
from nilus_dagster.dagster.resources import SinkResource, engine_call
from nilus_dagster.errors import NilusError
from nilus_dagster.manifest.loader import parse_pipeline
from nilus_dagster.redaction import redact


class NilusTableIOManager(dg.ConfigurableIOManager):
    """Loads a Nilus pipeline's table as the input of a downstream asset; stores nothing.

    Set on every pipeline asset by the definitions builder (under its ``io_manager`` key), so
    ``@dg.asset def revenue(orders: pa.Table)`` just works.
    """

    sink: SinkResource | None = Field(
        default=None,
        description="Where the tables live: the pipelines' sink resource (default settings "
        "when unset).",
    )

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        """Store nothing: the pipeline's run has committed its rows already."""
        # The run committed the rows with its position already; there is nothing to store.
        return None

    def load_input(self, context: dg.InputContext) -> Any:
        """The upstream pipeline's table (its window for a partitioned run), as annotated.

        Raises:
            Failure: The upstream asset is not a Nilus pipeline, or its table cannot be read.
        """
        upstream = context.upstream_output
        manifest = upstream.definition_metadata.get(META_MANIFEST) if upstream else None
        if manifest is None:
            raise dg.Failure(
                description=f"{context.asset_key.to_user_string()} is not a Nilus pipeline "
                "asset (no nilus/manifest metadata): it cannot be loaded by the Nilus IO manager"
            )
        path = manifest.value if isinstance(manifest, dg.MetadataValue) else manifest
        try:
            pipeline = parse_pipeline(str(path))
            call = engine_call(pipeline, None, self.sink or SinkResource())
            location = call.pipeline.table_location(call.env)
            kind = location_kind(location)
        except NilusError as exc:
            raise dg.Failure(description=redact(exc)) from None
        window = _input_window(context)
        table = kind.read(location, window)
        shown = "the whole table" if window is None else f"{window[0]} .. {window[1]}"
        context.log.info(
            f"loaded {table.num_rows} rows of {pipeline.name} ({shown}) from {kind.label} table "
            f"{redact(location.uri)}"
        )
        return _as_annotated(table, context.dagster_type.typing_type)


def _input_window(context: dg.InputContext) -> Window | None:
    """The downstream run's window of the table, or ``None`` for the whole table."""
    partitioned_run = context.has_partition_key or _has_partition_range(context)
    if not (partitioned_run and context.has_asset_partitions):
        return None
    try:
        window = context.asset_partitions_time_window
    except dg.DagsterInvariantViolationError:
        return None  # not time partitions: no window to cut
    return (window.start, window.end)


def _has_partition_range(context: dg.InputContext) -> bool:
    step = getattr(context, "step_context", None)
    return bool(step is not None and step.has_partition_key_range)


def _as_annotated(table: pa.Table, typing_type: Any) -> Any:
    module = getattr(typing_type, "__module__", "") or ""
    if module.startswith("polars"):
        import polars as pl

        return pl.from_arrow(table)
    if module.startswith("pandas"):
        return table.to_pandas()
    return table
