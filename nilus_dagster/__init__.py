"""Run DataOS Nilus NATS JetStream stream pipelines on Dagster, into Delta Lake, exactly once."""

import importlib
from typing import TYPE_CHECKING, Any

from nilus_dagster.errors import (
    ManifestError,
    NilusError,
    PlaceholderError,
    PositionError,
    SinkError,
    SourceError,
)
from nilus_dagster.version import __version__

if TYPE_CHECKING:
    from nilus_dagster.manifest import Pipeline, PipelineManifest, load_pipelines, parse_pipeline

# The manifest models (pydantic) load on first use, not with the package: every module of the
# package imports it first, the console script included, which starts its imports in its own
# way (see nilus_dagster.process_start).
_FROM_MANIFEST = ("Pipeline", "PipelineManifest", "load_pipelines", "parse_pipeline")


if not TYPE_CHECKING:  # type checkers see the imports above, and so catch misspelt names

    def __getattr__(name: str) -> Any:
        if name in _FROM_MANIFEST:
            value = getattr(importlib.import_module("nilus_dagster.manifest"), name)
            globals()[name] = value
            return value
        raise AttributeError(f"module 'nilus_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_MANIFEST})


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
