"""Pipeline manifest -> Dagster asset spec; subclass `DagsterNilusTranslator` to change it."""

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from nilus_dagster.dagster.constants import (
    DEFAULT_GROUP,
    META_COLUMN_SCHEMA,
    META_MANIFEST,
    META_SINK_ADDRESS,
    META_SOURCE_ADDRESS,
    META_STRATEGY,
    META_STREAM,
    META_SUBJECT,
    META_TABLE_URI,
)
from nilus_dagster.dagster.metadata import column_schema
from nilus_dagster.dagster.partitions import build_partitions_def
from nilus_dagster.dagster.readers import sink_kind
from nilus_dagster.errors import NilusError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.redaction import redact

_NOT_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]")
_NOT_TAG_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def dagster_name(text: str) -> str:
    """``text`` as a Dagster op/sensor name (letters, digits and ``_``)."""
    name = _NOT_NAME_CHARS.sub("_", text)
    return name if name[:1].isalpha() or name[:1] == "_" else f"_{name}"


def _code_reference(path: Path) -> dg.CodeReferencesMetadataValue:
    # Code references are beta in Dagster 1.13; the UI link to the manifest is worth it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.CodeReferencesMetadataValue(
            code_references=[dg.LocalFileCodeReference(file_path=str(path), label="Nilus manifest")]
        )


def _tag_key(text: str) -> str:
    return _NOT_TAG_CHARS.sub("_", text.strip())[:63] or "_"


@dataclass
class DagsterNilusTranslator:
    """Turns a pipeline into the asset Dagster shows. Every ``get_*`` method may be overridden.

    Args:
        display_env: Environment used at load time to show where the table lives
            (``NILUS_DEPOTS``, ``NILUS_LAKEHOUSE``); ``os.environ`` by default. Secrets are never
            filled at load time.

    Examples:
        .. code-block:: python

            class PrefixedTranslator(DagsterNilusTranslator):
                def get_asset_key(self, pipeline):
                    return dg.AssetKey(["streams", pipeline.name])
    """

    display_env: Mapping[str, str] | None = field(default=None)

    def get_asset_spec(self, pipeline: Pipeline) -> dg.AssetSpec:
        """The asset spec of ``pipeline``.

        It holds the key, group, description, tags, kinds, metadata and partitions.
        """
        return dg.AssetSpec(
            key=self.get_asset_key(pipeline),
            description=self.get_description(pipeline),
            group_name=self.get_group_name(pipeline),
            tags=self.get_tags(pipeline),
            kinds=self.get_kinds(pipeline),
            metadata=self.get_metadata(pipeline),
            partitions_def=self.get_partitions_def(pipeline),
            deps=[self.get_stream_asset_key(pipeline)],
            freshness_policy=self.get_freshness_policy(pipeline),
        )

    def get_stream_asset_key(self, pipeline: Pipeline) -> dg.AssetKey:
        """The key of the JetStream stream the pipeline reads.

        The stream is an upstream external asset, shared by every pipeline that reads it.
        """
        return dg.AssetKey(["nats", pipeline.stream])

    def get_stream_asset_spec(self, pipeline: Pipeline) -> dg.AssetSpec:
        """The external asset standing for the stream.

        It holds only what every pipeline reading the stream shares (the name), so that specs
        built for several pipelines are equal and merge.
        """
        return dg.AssetSpec(
            key=self.get_stream_asset_key(pipeline),
            description=f"NATS JetStream stream `{pipeline.stream}` (read by Nilus pipelines).",
            group_name=DEFAULT_GROUP,
            kinds={"nats"},
            metadata={META_STREAM: dg.MetadataValue.text(pipeline.stream)},
        )

    def get_asset_key(self, pipeline: Pipeline) -> dg.AssetKey:
        """The pipeline's asset key: its name."""
        return dg.AssetKey([pipeline.name])

    def get_group_name(self, pipeline: Pipeline) -> str:
        """``spec.dagster.group``, else the default group."""
        return pipeline.manifest.spec.dagster.group or DEFAULT_GROUP

    def get_description(self, pipeline: Pipeline) -> str:
        """The manifest's description, and where the pipeline reads and writes."""
        manifest = pipeline.manifest
        flow = (
            f"NATS JetStream stream `{pipeline.stream}`, subject `{pipeline.subject}` -> "
            f"{sink_kind(pipeline).label} table `{self.get_table_name(pipeline)}` "
            f"({manifest.sink.options.incremental_strategy})."
        )
        return f"{manifest.description.strip()}\n\n{flow}" if manifest.description else flow

    def get_tags(self, pipeline: Pipeline) -> dict[str, str]:
        """The manifest's tags, as Dagster labels."""
        # Nilus tags are labels; Dagster shows a tag with an empty value as a label.
        return {_tag_key(tag): "" for tag in pipeline.manifest.tags if tag.strip()}

    def get_kinds(self, pipeline: Pipeline) -> set[str]:
        """``nats`` and the sink's kind, under the names the Dagster UI has icons for."""
        return {"nats", self.get_sink_kind(pipeline)}

    def get_sink_kind(self, pipeline: Pipeline) -> str:
        """The Dagster kind of the pipeline's table store (``deltalake`` for Delta tables)."""
        return sink_kind(pipeline).dagster_kind

    def get_table_name(self, pipeline: Pipeline) -> str:
        """The fully qualified table name.

        That is ``<depot>.<schema>.<table>`` for a depot address, ``<schema>.<table>`` otherwise.
        """
        sink = pipeline.manifest.sink
        depot = sink.address.depot if sink.address.is_depot else None
        name = sink.options.qualified_name
        return f"{depot}.{name}" if depot else name

    def get_partitions_def(self, pipeline: Pipeline) -> dg.TimeWindowPartitionsDefinition | None:
        """The pipeline's event-time partitions, or ``None`` when it is not partitioned."""
        return build_partitions_def(pipeline)

    def get_metadata(self, pipeline: Pipeline) -> dict[str, Any]:
        """Static facts about the pipeline, for the asset's metadata.

        They are the redacted addresses, stream, subject, table, manifest file, and the column
        schema when the table already exists (local tables only: no I/O to remote storage
        while definitions load).
        """
        manifest = pipeline.manifest
        path = pipeline.path.resolve()
        metadata: dict[str, Any] = {
            META_SOURCE_ADDRESS: dg.MetadataValue.text(manifest.source.address.redacted()),
            META_STREAM: dg.MetadataValue.text(pipeline.stream),
            META_SUBJECT: dg.MetadataValue.text(pipeline.subject),
            META_SINK_ADDRESS: dg.MetadataValue.text(redact(manifest.sink.address.raw)),
            "dagster/table_name": dg.MetadataValue.text(self.get_table_name(pipeline)),
            META_STRATEGY: dg.MetadataValue.text(manifest.sink.options.incremental_strategy),
            META_MANIFEST: dg.MetadataValue.path(str(path)),
            "dagster/code_references": _code_reference(path),
        }
        try:
            location = pipeline.table_location(self.display_env, fill_secrets=False)
        except NilusError:
            # A depot missing from the depots file: the run reports it; the asset still loads.
            return metadata
        metadata[META_TABLE_URI] = dg.MetadataValue.path(redact(location.uri))
        metadata["dagster/uri"] = dg.MetadataValue.text(redact(location.uri))
        if location.is_local and _catalog_is_local(location):
            schema = column_schema(location)
            if schema is not None:
                metadata[META_COLUMN_SCHEMA] = dg.MetadataValue.table_schema(schema)
        return metadata

    def get_freshness_policy(self, pipeline: Pipeline) -> dg.FreshnessPolicy | None:
        """How stale the asset may get before the UI flags it.

        A service run reports every ``report_every_seconds`` even when nothing arrives, so five
        reports missed fail it (at least five minutes). Per-tick runs materialize only when
        messages arrive, so an hour without one only warns, a day fails.
        """
        if pipeline.run_mode == "service":
            every = pipeline.manifest.spec.dagster.service.report_every_seconds
            return dg.FreshnessPolicy.time_window(
                fail_window=timedelta(seconds=max(300.0, 5 * every))
            )
        return dg.FreshnessPolicy.time_window(
            fail_window=timedelta(days=1), warn_window=timedelta(hours=1)
        )

    def get_pool(self, pipeline: Pipeline) -> str:
        """The concurrency pool: one per pipeline, so that two runs never ingest at once."""
        return f"nilus/{pipeline.name}"

    def get_op_name(self, pipeline: Pipeline) -> str:
        """The name of the op that runs the pipeline."""
        return dagster_name(f"nilus_{pipeline.name}")

    def get_job_name(self, pipeline: Pipeline) -> str:
        """The pipeline's own in-process job: ``<name>_job``."""
        return dagster_name(f"{pipeline.name}_job")

    def get_sensor_name(self, pipeline: Pipeline) -> str:
        """The pipeline's per-tick sensor: ``<name>_sensor``."""
        return dagster_name(f"{pipeline.name}_sensor")


def _catalog_is_local(location: TableLocation) -> bool:
    # An Iceberg table's schema is in its catalog: read it only from an embedded SQLite file.
    return location.kind != "iceberg" or location.catalog.get("uri", "").startswith("sqlite:")
