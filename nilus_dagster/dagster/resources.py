"""Deployment settings for the engine: where NATS is, which credentials, where the tables live.

Manifests say *what* a pipeline does; these resources say *where it runs*. Both are
``ConfigurableResource`` subclasses, so a deployment overrides them (``Definitions(resources=...)``,
the component's ``nats:``/``sink:`` blocks) and tests swap them. Secrets go in as
``dg.EnvVar("NAME")``: Dagster reads the variable when a run or a sensor tick starts, and shows
only its name in the UI.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import dagster as dg
from pydantic import Field

from nilus_dagster.engine.settings import FAILOVER_TIMEOUT_ENV
from nilus_dagster.errors import SourceError
from nilus_dagster.manifest.depots import DEPOTS_ENV, LAKEHOUSE_ENV, TableLocation
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.redaction import register_secret

# Reserved variables through which explicit credentials reach the address. Going through a
# placeholder means the value is filled exactly once (braces in a password stay literal) and is
# registered for redaction like any other secret.
_CREDENTIAL_VARS = {
    "user": "NILUS_RESOURCE_NATS_USER",
    "password": "NILUS_RESOURCE_NATS_PASSWORD",
    "token": "NILUS_RESOURCE_NATS_TOKEN",
    "nkeys_seed": "NILUS_RESOURCE_NATS_NKEYS_SEED",
    "creds": "NILUS_RESOURCE_NATS_CREDS",
}


class NatsResource(dg.ConfigurableResource):
    """How every pipeline reaches NATS in this deployment.

    Everything is optional: by default each pipeline uses its manifest's address, with
    every ``{PLACEHOLDER}`` filled from the process environment at run time.

    Examples:
        .. code-block:: python

            import dagster as dg
            from nilus_dagster.dagster import NatsResource, build_nilus_definitions

            defs = build_nilus_definitions(
                "pipelines",
                resources={
                    "nats": NatsResource(
                        servers=["nats-0.nats:4222", "nats-1.nats:4222"],
                        env={"NATS_PASSWORD": dg.EnvVar("PROD_NATS_PASSWORD")},
                    )
                },
            )
    """

    servers: list[str] | None = Field(
        default=None,
        description="host:port list replacing every address's servers (else NILUS_NATS_SERVERS, "
        "else the address).",
    )
    connect_timeout: float = Field(
        default=5.0, description="Seconds a sensor's lag probe may spend connecting."
    )
    failover_timeout: float | None = Field(
        default=None,
        description="Seconds a run waits for NATS to come back (a new stream leader after a "
        "node failed, another server) before it fails; replaces every address's "
        "failover_timeout (else NILUS_NATS_FAILOVER_TIMEOUT, else the address, 30).",
    )
    probe_timeout: float = Field(
        default=20.0,
        description="Seconds a whole sensor lag probe may take before the tick is skipped.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Values for the addresses' {PLACEHOLDER}s; they win over the process "
        "environment. Use EnvVar for secrets.",
    )
    user: str | None = Field(default=None, description="Replaces every address's credentials.")
    password: str | None = Field(default=None, description="Goes with user. Use EnvVar.")
    token: str | None = Field(
        default=None, description="Replaces every address's credentials. Use EnvVar."
    )
    nkeys_seed: str | None = Field(
        default=None, description="Replaces every address's credentials. Use EnvVar."
    )
    creds: str | None = Field(
        default=None, description="Credentials file; replaces every address's credentials."
    )

    def credential_overrides(self) -> dict[str, str]:
        """The explicit credentials set on the resource, by address field."""
        values = {
            "user": self.user,
            "password": self.password,
            "token": self.token,
            "nkeys_seed": self.nkeys_seed,
            "creds": self.creds,
        }
        return {name: value for name, value in values.items() if value}


class PostgresResource(dg.ConfigurableResource):
    """Connection settings for every PostgreSQL sink in this deployment.

    Each value set here replaces that part of every ``postgresql://`` address and
    ``type: postgresql`` depot (so manifests need not carry credentials). Secrets go in as
    ``dg.EnvVar``: the UI shows the variable's name only.

    Examples:
        .. code-block:: python

            SinkResource(
                postgres=PostgresResource(user="loader", password=dg.EnvVar("PG_PASSWORD"))
            )
    """

    host: str | None = Field(default=None, description="Server host name or address.")
    port: int | None = Field(default=None, description="Server port (5432 by default).")
    dbname: str | None = Field(default=None, description="Database.")
    user: str | None = Field(default=None, description="User the sink connects as.")
    password: str | None = Field(default=None, description="The user's password. Use EnvVar.")
    sslmode: str | None = Field(
        default=None, description="libpq sslmode (disable, require, verify-full...)."
    )

    def connection_overrides(self) -> dict[str, str]:
        """The connection parameters set on the resource (the password registered as a secret)."""
        register_secret(self.password)
        values = {
            "host": self.host,
            "port": str(self.port) if self.port else None,
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
            "sslmode": self.sslmode,
        }
        return {name: value for name, value in values.items() if value}


class SinkResource(dg.ConfigurableResource):
    """Where every pipeline's table lives in this deployment, whatever the store.

    ``depots_file`` and ``lakehouse`` stand for ``NILUS_DEPOTS`` and ``NILUS_LAKEHOUSE``;
    ``storage_options`` are added to (and win over) the object-store options of every Delta and
    Iceberg table; ``postgres`` replaces parts of every PostgreSQL sink's connection.

    Examples:
        .. code-block:: python

            SinkResource(
                depots_file="depots.yaml",
                storage_options={"AWS_SECRET_ACCESS_KEY": dg.EnvVar("AWS_SECRET_ACCESS_KEY")},
                postgres=PostgresResource(password=dg.EnvVar("PG_PASSWORD")),
            )
    """

    depots_file: str | None = Field(
        default=None, description="Depots file (NILUS_DEPOTS): depot -> root + storage options."
    )
    lakehouse: str | None = Field(
        default=None,
        description="Folder for depots without a depots file (NILUS_LAKEHOUSE, ./.lakehouse).",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="deltalake storage options; use EnvVar for keys."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Values for the depots file's {PLACEHOLDER}s. Use EnvVar for secrets.",
    )
    postgres: PostgresResource | None = Field(
        default=None, description="Connection settings for PostgreSQL sinks (EnvVar secrets)."
    )


DeltaSinkResource = SinkResource
"""The name :class:`SinkResource` had while Delta was the only store; existing definitions that
use it keep working (it is the same class)."""


@dataclass(frozen=True)
class NilusResourceKeys:
    """The resource keys the pipelines' assets and sensors use.

    Change them to run two NATS deployments in one code location, or when a project already
    has resources under these names.

    Args:
        nats: The :class:`NatsResource`.
        sink: The :class:`SinkResource`.
        io_manager: The :class:`~nilus_dagster.dagster.io_manager.NilusTableIOManager` that
            loads the tables into downstream assets.
    """

    nats: str = "nats"
    sink: str = "nilus_sink"
    io_manager: str = "nilus_io_manager"


@dataclass(frozen=True)
class DeployedPipeline(Pipeline):
    """A pipeline whose table location carries the deployment's settings.

    Those are storage options for Delta tables and connection settings for PostgreSQL.
    """

    # Secrets (EnvVar values): never in a repr.
    storage_options: Mapping[str, str] = field(default_factory=dict, repr=False)
    postgres_options: Mapping[str, str] = field(default_factory=dict, repr=False)

    def table_location(
        self,
        env: Mapping[str, str] | None = None,
        *,
        fill_secrets: bool = True,
        connection: Mapping[str, str] | None = None,
    ) -> TableLocation:
        """The manifest's table location with the deployment's settings in it.

        The PostgreSQL settings replace the address's parts before its placeholders are filled,
        so a placeholder the resource stands in for needs no variable, and the table's address
        names the server the deployment writes to.
        """
        connection = {**self.postgres_options, **(connection or {})}
        location = super().table_location(env, fill_secrets=fill_secrets, connection=connection)
        if location.kind == "postgresql" or not self.storage_options:
            return location
        return replace(
            location, storage_options={**location.storage_options, **self.storage_options}
        )


@dataclass(frozen=True)
class EngineCall:
    """The engine's arguments for one pipeline under the deployment's resources."""

    pipeline: Pipeline
    env: dict[str, str]
    servers: list[str] | None


def engine_call(
    pipeline: Pipeline,
    nats: NatsResource | None = None,
    sink: SinkResource | None = None,
    base_env: Mapping[str, str] | None = None,
) -> EngineCall:
    """Combine a pipeline with the resources into what the engine takes.

    The environment is ``base_env`` (``os.environ``) with the resources' values on top; the
    engine reads placeholders, ``NILUS_DEPOTS``, ``NILUS_LAKEHOUSE``, ``NILUS_NATS_SERVERS`` and
    ``NILUS_NATS_FAILOVER_TIMEOUT`` from it.
    """
    nats = nats or NatsResource()
    sink = sink or SinkResource()
    env = dict(os.environ if base_env is None else base_env)
    env.update(sink.env)
    env.update(nats.env)
    if sink.depots_file:
        env[DEPOTS_ENV] = sink.depots_file
    if sink.lakehouse:
        env[LAKEHOUSE_ENV] = sink.lakehouse
    if nats.failover_timeout is not None:
        # Checked (positive, finite) with the variable, where the engine reads it.
        env[FAILOVER_TIMEOUT_ENV] = repr(nats.failover_timeout)

    overrides = nats.credential_overrides()
    modes = [m for m in ("token", "nkeys_seed", "creds") if m in overrides]
    if len(modes) + bool({"user", "password"} & set(overrides)) > 1:
        raise SourceError(
            f"the NATS resource sets several auth modes ({', '.join(sorted(overrides))}); "
            "keep one: user/password, token, nkeys_seed or creds"
        )
    source = pipeline.manifest.source
    address = source.address
    if overrides:
        # One auth mode at a time: the resource's credentials replace the manifest's. Setting
        # only a password keeps the manifest's user (and the other way round).
        fields: dict[str, str | None] = dict.fromkeys(_CREDENTIAL_VARS, None)
        if {"user", "password"} & set(overrides):
            fields["user"], fields["password"] = address.user, address.password
        for name, value in overrides.items():
            fields[name] = "{" + _CREDENTIAL_VARS[name] + "}"
            env[_CREDENTIAL_VARS[name]] = value
        address = replace(address, **fields)
    manifest = pipeline.manifest
    if address is not source.address:
        manifest = manifest.model_copy(
            update={
                "spec": manifest.spec.model_copy(
                    update={"source": source.model_copy(update={"address": address})}
                )
            }
        )
    deployed: Pipeline = pipeline
    postgres = sink.postgres.connection_overrides() if sink.postgres else {}
    if manifest is not pipeline.manifest or sink.storage_options or postgres:
        deployed = DeployedPipeline(
            manifest=manifest,
            path=pipeline.path,
            storage_options=dict(sink.storage_options),
            postgres_options=postgres,
        )
    servers = list(nats.servers) if nats.servers else None
    return EngineCall(pipeline=deployed, env=env, servers=servers)
