"""What a run needs from a pipeline at run time: the resolved address, table and servers."""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nilus_dagster.errors import SourceError
from nilus_dagster.manifest.address import NatsAddress
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.manifest.loader import Pipeline

SERVERS_ENV = "NILUS_NATS_SERVERS"
FAILOVER_TIMEOUT_ENV = "NILUS_NATS_FAILOVER_TIMEOUT"


@dataclass(frozen=True)
class RuntimeSettings:
    """A pipeline with its placeholders filled: only ever built inside a run or a sensor tick."""

    pipeline: Pipeline
    address: NatsAddress
    location: TableLocation
    servers: tuple[str, ...] | None
    failover_timeout: float


def runtime_settings(
    pipeline: Pipeline,
    *,
    env: Mapping[str, str] | None = None,
    servers: Sequence[str] | None = None,
) -> RuntimeSettings:
    """Fill the pipeline's placeholders from ``env`` (``os.environ`` by default).

    ``servers`` (or the ``NILUS_NATS_SERVERS`` variable, comma-separated) replaces the servers
    of the address: one deployment can point every pipeline at its own NATS cluster. Likewise
    ``NILUS_NATS_FAILOVER_TIMEOUT`` replaces the address's ``failover_timeout``.

    Raises:
        PlaceholderError: A ``{VARIABLE}`` the pipeline needs is not set.
        ManifestError: The sink's depot cannot be resolved.
        SourceError: ``NILUS_NATS_FAILOVER_TIMEOUT`` is not a positive number.
    """
    environment = pipeline.environment(os.environ if env is None else env)
    if not servers and environment.get(SERVERS_ENV):
        servers = [s.strip() for s in environment[SERVERS_ENV].split(",") if s.strip()]
    address = pipeline.resolved_source(environment)
    return RuntimeSettings(
        pipeline=pipeline,
        address=address,
        location=pipeline.table_location(environment),
        servers=tuple(servers) if servers else None,
        failover_timeout=_failover_timeout(environment.get(FAILOVER_TIMEOUT_ENV))
        or address.failover_timeout,
    )


def _failover_timeout(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise SourceError(
            f"{FAILOVER_TIMEOUT_ENV}={text!r} is not a positive number of seconds: set it to "
            "how long a run may wait for NATS to come back (e.g. 30), or unset it to use the "
            "address's failover_timeout"
        )
    return seconds
