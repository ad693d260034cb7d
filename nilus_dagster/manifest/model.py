"""The typed Nilus manifest: the v2 shape, with the v1 hyphenated option spellings accepted."""

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PositiveInt,
    ValidationInfo,
    field_validator,
)

from nilus_dagster.manifest.address import (
    DIRECT_SCHEMES,
    NatsAddress,
    SinkAddress,
    parse_nats_address,
    parse_sink_address,
)

IncrementalStrategy = Literal["append", "replace", "merge"]
DEFAULT_COMPACT_EVERY = 100
LOCAL_CHECKPOINT_EVERY = 100
REMOTE_CHECKPOINT_EVERY = 10
LOCAL_LOG_RETENTION_HOURS = 0.25
DEFAULT_EXPIRE_EVERY = 10
DEFAULT_KEEP_SNAPSHOTS = 20

_NAME = re.compile(r"^[a-z0-9]([a-z0-9_\-]{0,62}[a-z0-9])?$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _hyphens_to_underscores(value: Any) -> Any:
    # v1 manifests spell option keys with hyphens (dest-table); both spellings are accepted.
    if not isinstance(value, dict):
        return value
    converted: dict[Any, Any] = {}
    spelled: dict[Any, Any] = {}
    for key, item in value.items():
        new = key.replace("-", "_") if isinstance(key, str) else key
        if new in converted:
            raise ValueError(
                f"{spelled[new]!r} and {key!r} are the same option spelled twice; keep one"
            )
        converted[new], spelled[new] = item, key
    return converted


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SourceOptions(_Strict):
    """``spec.source.options``."""

    source_table: str = Field(min_length=1, description="JetStream stream name.")
    run_in_loop: bool = Field(
        default=False, description="Sensor starts RUNNING and each run drains what is pending."
    )


def is_table_location(dest_table: str) -> bool:
    """Whether ``dest_table`` is a fully qualified location (a URI or an absolute path)."""
    return "://" in dest_table or dest_table.startswith("/")


def _check_table_location(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if sep and scheme.lower() not in DIRECT_SCHEMES:
        raise ValueError(
            f"{value!r:.80} is not an object-store location: a fully qualified dest_table "
            f"starts with one of {', '.join(s + '://' for s in DIRECT_SCHEMES)} or is an "
            "absolute path (or write <schema>.<table>)"
        )
    path = rest if sep else value
    if scheme.lower() != "file" and sep:
        path = path.partition("/")[2]  # after the bucket or container
    if any(c.isspace() or c in "?#" for c in value) or not path.strip("/"):
        raise ValueError(
            f"{value!r:.80} is not a table location: give the table's folder, e.g. "
            "s3://analytics-lake/nilus/orders or /data/lake/orders (no spaces, no ?query)"
        )
    return value.rstrip("/")


def _location_parts(location: str) -> tuple[str, str]:
    """(parent folder, last folder) of a table location: its schema and table names."""
    path = location.partition("://")[2] if "://" in location else location
    parts = [p for p in path.split("/") if p]
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


class SinkOptions(_Strict):
    """``spec.sink.options``."""

    dest_table: str = Field(
        description="schema.table, or for object stores the table's location (URI or absolute path)"
    )
    incremental_strategy: IncrementalStrategy = "append"
    primary_key: tuple[str, ...] | None = Field(default=None, validate_default=True)
    partition_by: tuple[str, ...] | None = Field(
        default=None, description="Partition columns of a lakehouse table, set when it is created."
    )
    create_table: bool = True
    commit_max_rows: PositiveInt = Field(
        default=100_000, description="Rows per Delta commit at most."
    )
    commit_max_bytes: PositiveInt = Field(
        default=64 * 1024 * 1024, description="Payload bytes per Delta commit at most."
    )
    compact_every: int = Field(
        default=DEFAULT_COMPACT_EVERY,
        ge=0,
        description=(
            "Compact small files every N commits (0: never): table versions for Delta, commits "
            "of a run for Iceberg."
        ),
    )
    checkpoint_every: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Write a Delta checkpoint every N table versions (0: only Delta's own, every "
            f"delta.checkpointInterval versions). Default {LOCAL_CHECKPOINT_EVERY} on a local "
            "file system, where a reader replays the entries after the last checkpoint cheaply, "
            f"and {REMOTE_CHECKPOINT_EVERY} on object stores, where each is a request."
        ),
    )
    log_retention_hours: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Hours of Delta log history (time travel) a table the sink creates keeps: its "
            "delta.logRetentionDuration, and its delta.deletedFileRetentionDuration (at least "
            "1 hour). Default: "
            f"{LOCAL_LOG_RETENTION_HOURS:g} on a local file system, where every commit lists "
            "the whole log; Delta's own 30 days (and a week) on object stores."
        ),
    )
    expire_every: int = Field(
        default=DEFAULT_EXPIRE_EVERY,
        ge=0,
        description="Expire old Iceberg snapshots every N commits (0: never).",
    )
    keep_snapshots: int = Field(
        default=DEFAULT_KEEP_SNAPSHOTS,
        ge=1,
        description="Iceberg snapshots kept when old ones are expired.",
    )

    @field_validator("dest_table")
    @classmethod
    def _schema_dot_table(cls, value: str) -> str:
        if is_table_location(value):
            return _check_table_location(value)
        parts = value.split(".")
        if len(parts) != 2 or not all(_IDENT.match(p) for p in parts):
            raise ValueError(
                f"must be <schema>.<table> (letters, digits, '_' or '-', one dot), or for object "
                f"stores the table's location (s3://bucket/path/table or an absolute path), got "
                f"{value!r:.80}: write e.g. dest_table: analytics.orders"
            )
        return value

    @field_validator("primary_key", "partition_by", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",")]
        if not isinstance(value, list | tuple) or not all(isinstance(p, str) and p for p in value):
            raise ValueError(f"must be a column name or a list of column names, got {value!r:.80}")
        if not value:
            raise ValueError("is an empty list: give a column name or a list of column names")
        if len(set(value)) != len(value):
            raise ValueError(f"names a column twice: {list(value)!r:.80}")
        return value

    @field_validator("primary_key")
    @classmethod
    def _merge_needs_key(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        # Checked here rather than on the model so that the problem names primary_key.
        if info.data.get("incremental_strategy") == "merge" and not value:
            raise ValueError(
                "is required with incremental_strategy: merge (the column(s) a row is upserted "
                "on): add primary_key: <column> (or a list) under spec.sink.options"
            )
        return value

    @property
    def location(self) -> str | None:
        """The table's location when ``dest_table`` is fully qualified, else ``None``."""
        return self.dest_table if is_table_location(self.dest_table) else None

    @property
    def schema_name(self) -> str:
        """The schema: before the dot, or a location's parent folder.

        A location's bucket at the top, empty for a folder at the file system's root.
        """
        if self.location:
            return _location_parts(self.location)[0]
        return self.dest_table.split(".")[0]

    @property
    def table_name(self) -> str:
        """The table: after the dot, or a location's last folder."""
        if self.location:
            return _location_parts(self.location)[1]
        return self.dest_table.split(".")[1]

    @property
    def qualified_name(self) -> str:
        """``<schema>.<table>``: ``dest_table`` itself, or derived from a location's folders."""
        if not self.location:
            return self.dest_table
        return ".".join(p for p in (self.schema_name, self.table_name) if p)


def _nats_address(value: Any) -> NatsAddress:
    if isinstance(value, NatsAddress):
        return value
    if not isinstance(value, str):
        raise ValueError("must be text: nats+jetstream://HOST:PORT?subject=SUBJECT")
    return parse_nats_address(value)


def _sink_address(value: Any) -> SinkAddress:
    if isinstance(value, SinkAddress):
        return value
    if not isinstance(value, str):
        raise ValueError("must be text: dataos://<depot>?purpose=rw")
    return parse_sink_address(value)


class Source(_Strict):
    """``spec.source``."""

    address: Annotated[NatsAddress, PlainValidator(_nats_address)]
    options: Annotated[SourceOptions, BeforeValidator(_hyphens_to_underscores)]


class Sink(_Strict):
    """``spec.sink``."""

    address: Annotated[SinkAddress, PlainValidator(_sink_address)]
    options: Annotated[SinkOptions, BeforeValidator(_hyphens_to_underscores)]


class Secret(_Strict):
    """``spec.use.projection.secrets[]``: a secret the pipeline may read."""

    id: str
    contextAlias: str | None = None  # the manifest's own spelling


class EnvVarProjection(_Strict):
    """One environment variable projected from secrets (a ``template``) or a ``value``."""

    key: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    template: str | None = None
    value: str | None = None


class Projections(_Strict):
    """``spec.use.projection.projections``."""

    envVars: tuple[EnvVarProjection, ...] = ()


class Projection(_Strict):
    """``spec.use.projection``: secrets and the variables made from them."""

    secrets: tuple[Secret, ...] = ()
    projections: Projections = Projections()


class Use(_Strict):
    """``spec.use``."""

    projection: Projection = Projection()


class ServiceSettings(_Strict):
    """``spec.dagster.service``: how a service run carries the pipeline (all optional)."""

    run_seconds: float = Field(
        default=3600.0,
        ge=1,
        description="A service run ends by itself after this long (new code and manifests roll "
        "out); the sensor starts the next one.",
    )
    report_every_seconds: float = Field(
        default=60.0, gt=0, description="Report a materialization at least this often."
    )
    report_every_commits: PositiveInt = Field(
        default=100, description="...or after this many commits, whichever comes first."
    )
    poll_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often a caught-up service looks for messages."
    )
    # 50: a fleet of 200 pipelines in one group is 4 run processes (about 1.7 GB of RSS, where
    # 20 a run made 10 and 3.3 GB), and its service runs leave 6 of the default run queue's 10
    # slots (max_concurrent_runs) to backfills and UI materializations instead of none.
    max_pipelines: PositiveInt = Field(
        default=50, description="Most pipelines of one group that one service run carries."
    )
    heartbeat_seconds: float = Field(
        default=15.0,
        gt=0,
        description="How often a service run says it is alive; silent for four of these, the "
        "supervisor takes its worker for dead and replaces the run.",
    )


class DagsterSettings(_Strict):
    """``spec.dagster``: how the pipeline appears in Dagster (all optional)."""

    group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]+$")
    partitions: Literal["daily", "hourly", "none"] = "daily"
    partitions_start: str | None = Field(
        default=None, description="First partition date (YYYY-MM-DD); default 2020-01-01."
    )
    max_lag: int = Field(default=10_000, ge=0, description="Sequence-lag check bound.")
    sensor_interval_seconds: PositiveInt | None = None
    run_mode: Literal["service", "per_tick"] | None = Field(
        default=None,
        description="service: one long-lived run ingests and reports as it goes; per_tick: the "
        "sensor requests a run per tick. Default: service when run_in_loop is true.",
    )
    service: ServiceSettings = ServiceSettings()


class Spec(_Strict):
    """``spec``: a stream pipeline's source, sink and Dagster settings."""

    type: str
    compute: str | None = None
    use: Use = Use()
    source: Source
    sink: Sink
    dagster: DagsterSettings = DagsterSettings()

    @field_validator("type")
    @classmethod
    def _stream_only(cls, value: str) -> str:
        if value != "stream":
            raise ValueError(
                f"{value!r} is not supported: nilus_dagster runs stream pipelines; "
                "set spec.type: stream"
            )
        return value


class PipelineManifest(_Strict):
    """A Nilus stream pipeline, as written in its YAML file."""

    name: str
    version: str = "v1alpha"
    type: Literal["nilus"] = "nilus"
    tags: tuple[str, ...] = ()
    description: str | None = None
    spec: Spec

    @field_validator("name")
    @classmethod
    def _dns_like(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} must be lower-case letters, digits, '-' or '_' (at most 64), "
                "starting and ending with a letter or digit"
            )
        return value

    @property
    def source(self) -> Source:
        """``spec.source``."""
        return self.spec.source

    @property
    def sink(self) -> Sink:
        """``spec.sink``."""
        return self.spec.sink
