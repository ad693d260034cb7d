"""What a run needs from a pipeline at run time: the resolved address, table and servers."""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nilus_dagster.manifest.address import NatsAddress
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.manifest.loader import Pipeline

SERVERS_ENV = "NILUS_NATS_SERVERS"


@dataclass(frozen=True)
class RuntimeSettings:
    """A pipeline with its placeholders filled: only ever built inside a run or a sensor tick."""

    pipeline: Pipeline
    address: NatsAddress
    location: TableLocation
    servers: tuple[str, ...] | None


def runtime_settings(
    pipeline: Pipeline,
    *,
    env: Mapping[str, str] | None = None,
    servers: Sequence[str] | None = None,
) -> RuntimeSettings:
    """Fill the pipeline's placeholders from ``env`` (``os.environ`` by default).

    ``servers`` (or the ``NILUS_NATS_SERVERS`` variable, comma-separated) replaces the servers
    of the address: one deployment can point every pipeline at its own NATS cluster.

    Raises:
        PlaceholderError: A ``{VARIABLE}`` the pipeline needs is not set.
        ManifestError: The sink's depot cannot be resolved.
    """
    environment = pipeline.environment(os.environ if env is None else env)
    if not servers and environment.get(SERVERS_ENV):
        servers = [s.strip() for s in environment[SERVERS_ENV].split(",") if s.strip()]
    return RuntimeSettings(
        pipeline=pipeline,
        address=pipeline.resolved_source(environment),
        location=pipeline.table_location(environment),
        servers=tuple(servers) if servers else None,
    )
