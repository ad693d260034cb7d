"""The Dagster layer: what a project composes with.

``build_nilus_definitions`` (or the ``NilusPipelinesComponent`` in a ``dg`` project) turns
manifests into assets, checks, jobs and sensors; ``build_nilus_asset`` and
``DagsterNilusTranslator`` are for building them one by one or changing how they look; the
resources and the IO manager configure where they run and hand tables to downstream assets.
Everything else in this package is internal. Thin by design: every NATS and table operation
goes through :mod:`nilus_dagster.engine`.
"""

from nilus_dagster.dagster.assets import NilusRunConfig, build_nilus_asset
from nilus_dagster.dagster.component import NilusPipelinesComponent
from nilus_dagster.dagster.definitions import (
    build_nilus_definitions,
    build_pipeline_definitions,
    default_resources,
)
from nilus_dagster.dagster.io_manager import NilusTableIOManager
from nilus_dagster.dagster.resources import (
    DeltaSinkResource,
    NatsResource,
    NilusResourceKeys,
    PostgresResource,
    SinkResource,
)
from nilus_dagster.dagster.translator import DagsterNilusTranslator

__all__ = [
    "DagsterNilusTranslator",
    "DeltaSinkResource",
    "NatsResource",
    "NilusPipelinesComponent",
    "NilusResourceKeys",
    "NilusRunConfig",
    "NilusTableIOManager",
    "PostgresResource",
    "SinkResource",
    "build_nilus_asset",
    "build_nilus_definitions",
    "build_pipeline_definitions",
    "default_resources",
]
