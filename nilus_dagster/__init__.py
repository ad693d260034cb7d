"""Run DataOS Nilus NATS JetStream stream pipelines on Dagster, into Delta Lake, exactly once."""

from nilus_dagster.errors import (
    ManifestError,
    NilusError,
    PlaceholderError,
    PositionError,
    SinkError,
    SourceError,
)
from nilus_dagster.manifest import Pipeline, PipelineManifest, load_pipelines, parse_pipeline
from nilus_dagster.version import __version__

__all__ = [
    "ManifestError",
    "NilusError",
    "Pipeline",
    "PipelineManifest",
    "PlaceholderError",
    "PositionError",
    "SinkError",
    "SourceError",
    "__version__",
    "load_pipelines",
    "parse_pipeline",
]
