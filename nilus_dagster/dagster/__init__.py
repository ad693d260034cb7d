"""The Dagster layer: manifests -> assets, checks, sensors, resources and a component.

Thin by design: every NATS and Delta operation goes through :mod:`nilus_dagster.engine`.
"""

from nilus_dagster.dagster.assets import NilusRunConfig, build_nilus_asset
from nilus_dagster.dagster.checks import build_check_specs, check_results
from nilus_dagster.dagster.component import NilusPipelinesComponent
from nilus_dagster.dagster.definitions import (
    build_nilus_definitions,
    build_pipeline_definitions,
    default_resources,
)
from nilus_dagster.dagster.partitions import build_partitions_def, sensor_partition_range
from nilus_dagster.dagster.resources import (
    DeltaSinkResource,
    NatsResource,
    PostgresResource,
    engine_call,
)
from nilus_dagster.dagster.sensor import build_nilus_sensor
from nilus_dagster.dagster.translator import DagsterNilusTranslator

__all__ = [
    "DagsterNilusTranslator",
    "DeltaSinkResource",
    "NatsResource",
    "NilusPipelinesComponent",
    "NilusRunConfig",
    "PostgresResource",
    "build_check_specs",
    "build_nilus_asset",
    "build_nilus_definitions",
    "build_nilus_sensor",
    "build_partitions_def",
    "build_pipeline_definitions",
    "check_results",
    "default_resources",
    "engine_call",
    "sensor_partition_range",
]
