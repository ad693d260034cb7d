"""A Dagster Component for projects that use ``dg``: a ``defs.yaml`` that loads Nilus manifests.

.. code-block:: yaml

    # defs/ingest/defs.yaml
    type: nilus_dagster.dagster.NilusPipelinesComponent
    attributes:
      pipelines: [pipelines]          # folders, files or globs, relative to this file
      nats:
        servers: [nats-0.nats:4222]
        password: {env: NATS_PASSWORD}  # read when a run or tick starts, never at load time
      sink:
        depots_file: depots.yaml
      on_invalid: skip                # or fail

``{env: NAME}`` becomes ``dg.EnvVar("NAME")``. Avoid ``{{ env.NAME }}`` templates for secrets:
they are resolved when definitions load, so the value would show in the UI's resource config.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
from dagster.components.resolved.context import ResolutionContext

from nilus_dagster.dagster.constants import NATS_RESOURCE_KEY, SINK_RESOURCE_KEY
from nilus_dagster.dagster.definitions import build_nilus_definitions
from nilus_dagster.dagster.resources import DeltaSinkResource, NatsResource


def _env_vars(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"env"} and isinstance(value["env"], str):
            return dg.EnvVar(value["env"])
        return {k: _env_vars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_env_vars(v) for v in value]
    return value


def _resolve_nats(context: ResolutionContext, raw: Any) -> NatsResource | None:
    if raw is None:
        return None
    return NatsResource(**_env_vars(context.resolve_value(raw)))


def _resolve_sink(context: ResolutionContext, raw: Any) -> DeltaSinkResource | None:
    if raw is None:
        return None
    values = _env_vars(context.resolve_value(raw))
    # Relative files are relative to the defs.yaml folder, like `pipelines`.
    for name in ("depots_file", "lakehouse"):
        value = values.get(name)
        if isinstance(value, str) and not isinstance(value, dg.EnvVar) and "://" not in value:
            values[name] = str(context.resolve_source_relative_path(value))
    return DeltaSinkResource(**values)


@dataclass
class NilusPipelinesComponent(dg.Component, dg.Resolvable):
    """Nilus NATS JetStream stream pipelines as assets, checks and sensors.

    Every manifest found under ``pipelines`` becomes an asset (runs the engine into its Delta
    table), with lag, gap and dead-letter checks and a sensor that keeps it fresh. ``nats`` and
    ``sink`` configure the ``nats`` and ``nilus_sink`` resources for this deployment.
    """

    pipelines: Sequence[str] = field(default_factory=lambda: ["pipelines"])
    nats: Annotated[
        NatsResource | None,
        dg.Resolver(
            _resolve_nats,
            model_field_type=dict[str, Any] | None,
            description="NatsResource settings: servers, connect_timeout, env, credentials.",
        ),
    ] = None
    sink: Annotated[
        DeltaSinkResource | None,
        dg.Resolver(
            _resolve_sink,
            model_field_type=dict[str, Any] | None,
            description="DeltaSinkResource settings: depots_file, lakehouse, storage_options.",
        ),
    ] = None
    on_invalid: Literal["skip", "fail"] = "skip"

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        targets = [
            pattern if Path(pattern).is_absolute() else str(context.path / pattern)
            for pattern in self.pipelines
        ]
        resources: dict[str, Any] = {}
        if self.nats is not None:
            resources[NATS_RESOURCE_KEY] = self.nats
        if self.sink is not None:
            resources[SINK_RESOURCE_KEY] = self.sink
        return build_nilus_definitions(targets, resources=resources, on_invalid=self.on_invalid)
