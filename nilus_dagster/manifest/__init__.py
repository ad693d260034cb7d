"""Nilus YAML -> a typed, validated model; addresses, placeholders, depots and projections."""

from nilus_dagster.manifest.address import (
    NatsAddress,
    SinkAddress,
    parse_nats_address,
    parse_sink_address,
)
from nilus_dagster.manifest.depots import TableLocation, resolve_table_location
from nilus_dagster.manifest.loader import (
    Pipeline,
    collect_pipelines,
    default_pipeline_targets,
    find_manifest_files,
    load_pipelines,
    parse_pipeline,
)
from nilus_dagster.manifest.model import PipelineManifest

__all__ = [
    "NatsAddress",
    "Pipeline",
    "PipelineManifest",
    "SinkAddress",
    "TableLocation",
    "collect_pipelines",
    "default_pipeline_targets",
    "find_manifest_files",
    "load_pipelines",
    "parse_nats_address",
    "parse_pipeline",
    "parse_sink_address",
    "resolve_table_location",
]
