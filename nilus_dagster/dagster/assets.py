"""The asset factory: one pipeline manifest -> one asset (with its checks) that runs the engine."""

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timezone

import dagster as dg
from pydantic import Field

from nilus_dagster.dagster.checks import build_check_specs, check_results
from nilus_dagster.dagster.constants import (
    META_COLUMN_SCHEMA,
    META_PARTITION_ROW_COUNT,
    MODE_WINDOW,
    PIPELINE_TAG,
)
from nilus_dagster.dagster.metadata import column_schema, run_metadata
from nilus_dagster.dagster.partitions import run_mode
from nilus_dagster.dagster.resources import (
    EngineCall,
    NatsResource,
    NilusResourceKeys,
    SinkResource,
    engine_call,
)
from nilus_dagster.dagster.translator import DagsterNilusTranslator
from nilus_dagster.engine import Progress, RunReport, run_pipeline_async, runtime_settings
from nilus_dagster.errors import ManifestError, NilusError, PlaceholderError, PositionError
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.redaction import redact

PROGRESS_LOG_SECONDS = 5.0

# Errors a retry cannot fix: the run fails with the message and Dagster does not retry it.
_PERMANENT = (PositionError, PlaceholderError, ManifestError)


class NilusRunConfig(dg.Config):
    """Optional launch-time settings of one run (the launchpad's ``ops`` config)."""

    drain: bool | None = Field(
        default=None,
        description="true: ingest everything pending at the start; false: one batch; "
        "empty: the manifest's run_in_loop.",
    )
    max_messages: int | None = Field(default=None, gt=0, description="Stop after N messages.")
    max_seconds: float | None = Field(default=None, gt=0, description="Stop pulling after N s.")


def build_nilus_asset(
    pipeline: Pipeline,
    *,
    translator: DagsterNilusTranslator | None = None,
    resource_keys: NilusResourceKeys | None = None,
) -> dg.AssetsDefinition:
    """Build the asset of one pipeline.

    The asset needs the ``nats`` (:class:`NatsResource`) and ``nilus_sink``
    (:class:`SinkResource`) resources, and downstream assets load its table through the
    ``nilus_io_manager`` (:class:`NilusTableIOManager`); ``resource_keys`` renames them. A run
    without a partition, or launched by the pipeline's sensor, ingests what is pending; a run
    for a partition (range) replaces exactly those windows' rows (see
    :mod:`nilus_dagster.dagster.partitions`). Each materialization carries the run metadata and
    the three check results.

    One run per pipeline at a time: the sensor never requests a run while one is queued or
    running, and the asset is in the concurrency pool ``nilus/<name>``, which Dagster enforces
    for every run (UI, CLI, backfills) once the instance gives pools a limit: set
    ``concurrency: {pools: {default_limit: 1}}`` in ``dagster.yaml``, or
    ``dagster instance concurrency set nilus/<name> 1``. Even without it, a second run does
    not duplicate rows: each commit is checked against the committed position.

    Args:
        pipeline: The validated manifest.
        translator: How the pipeline appears in Dagster.
        resource_keys: The keys of the resources and the IO manager.

    Returns:
        The asset, partitioned per ``spec.dagster.partitions`` with a single-run backfill
        policy, in the concurrency pool ``nilus/<name>``.
    """
    translator = translator or DagsterNilusTranslator()
    keys = resource_keys or NilusResourceKeys()
    spec = translator.get_asset_spec(pipeline).with_io_manager_key(keys.io_manager)
    key = spec.key

    @dg.multi_asset(
        name=translator.get_op_name(pipeline),
        specs=[spec],
        check_specs=build_check_specs(pipeline, key),
        backfill_policy=dg.BackfillPolicy.single_run() if spec.partitions_def else None,
        pool=translator.get_pool(pipeline),
        op_tags={PIPELINE_TAG: pipeline.name},
        required_resource_keys={keys.nats, keys.sink},
    )
    async def _ingest(
        context: dg.AssetExecutionContext, config: NilusRunConfig
    ) -> dg.MaterializeResult:
        nats = getattr(context.resources, keys.nats)
        sink = getattr(context.resources, keys.sink)
        return await materialize_pipeline(context, pipeline, key, config, nats, sink)

    return _ingest


async def materialize_pipeline(
    context: dg.AssetExecutionContext,
    pipeline: Pipeline,
    key: dg.AssetKey,
    config: NilusRunConfig,
    nats: NatsResource,
    sink: SinkResource,
) -> dg.MaterializeResult:
    """One run of the pipeline's asset: decide append or window, call the engine, report."""
    partitioned = context.has_partition_key or context.has_partition_key_range
    mode = run_mode(context.run.tags, partitioned)
    window = None
    if mode == MODE_WINDOW:
        if not partitioned:
            raise dg.Failure(
                description="nilus/mode=window needs a partition or a partition range: select "
                "the windows to replace",
                allow_retries=False,
            )
        time_window = context.partition_time_window
        window = (time_window.start, time_window.end)
        context.log.info(
            f"{pipeline.name}: replacing the rows of {time_window.start.isoformat()} .. "
            f"{time_window.end.isoformat()} from the stream"
        )
    else:
        context.log.info(f"{pipeline.name}: ingesting what is pending on {pipeline.subject}")

    try:
        call = engine_call(pipeline, nats, sink)
        if window is not None and window[1] > datetime.now(timezone.utc):
            # The range reaches the window still filling: ingest what is pending first, so
            # "Materialize" on today's partition gives today's rows up to now, not up to the
            # last sensor run.
            await run_pipeline_async(
                call.pipeline,
                env=call.env,
                servers=call.servers,
                drain=True,
                logger=context.log,
            )
        report = await run_pipeline_async(
            call.pipeline,
            env=call.env,
            servers=call.servers,
            drain=config.drain,
            max_messages=config.max_messages,
            max_seconds=config.max_seconds,
            window=window,
            on_progress=_progress_logger(context, pipeline),
            logger=context.log,
        )
    except NilusError as exc:
        # The engine's messages say what is wrong and what to do; they are the failure.
        raise dg.Failure(
            description=f"{pipeline.name}: {redact(exc)}",
            allow_retries=not isinstance(exc, _PERMANENT),
        ) from None
    extra: dict[str, dg.MetadataValue] = {}
    if window is not None and len(context.partition_keys) == 1:
        # A window run's rows are exactly its partition's. (A range run records one
        # materialization per partition with the same metadata, so a count would be wrong.)
        extra[META_PARTITION_ROW_COUNT] = dg.MetadataValue.int(report.rows_written)
    return await materialize_result(pipeline, key, report, call, extra)


async def materialize_result(
    pipeline: Pipeline,
    key: dg.AssetKey,
    report: RunReport,
    call: EngineCall,
    extra_metadata: dict[str, dg.MetadataValue] | None = None,
) -> dg.MaterializeResult:
    """The materialization: run metadata, the column schema, and the check results."""
    metadata = {**run_metadata(report), **(extra_metadata or {})}
    schema = await asyncio.to_thread(_schema_after_run, call)
    if schema is not None:
        metadata[META_COLUMN_SCHEMA] = dg.MetadataValue.table_schema(schema)
    return dg.MaterializeResult(
        asset_key=key, metadata=metadata, check_results=check_results(pipeline, key, report)
    )


def _schema_after_run(call: EngineCall) -> dg.TableSchema | None:
    settings = runtime_settings(call.pipeline, env=call.env, servers=call.servers)
    return column_schema(settings.location)


def _progress_logger(
    context: dg.AssetExecutionContext, pipeline: Pipeline
) -> Callable[[Progress], None]:
    last = [0.0]

    def log(progress: Progress) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_LOG_SECONDS:
            return
        last[0] = now
        target = f" of {progress.target}" if progress.target else ""
        context.log.info(
            f"{pipeline.name}: {progress.messages} messages committed, position "
            f"{progress.position}{target}, {progress.messages_per_second:,.0f} msg/s"
        )

    return log
