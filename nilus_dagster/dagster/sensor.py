"""The sensor of one pipeline: it decides, it never consumes.

Each tick compares the stream with the committed position (``measure_lag``: a few JetStream API
calls and a read of the Delta log, bounded by the NATS resource's timeouts), records the lag as an
``AssetObservation`` when it changed (and hourly otherwise) and the lag check when its result
changed (:mod:`nilus_dagster.dagster.health`), and requests a run only when messages are
pending and no run of the pipeline is queued or running. Runs carry no ``run_key``: a failed run
is simply requested again on a later tick, because the messages are still pending.
"""

import asyncio
import math
import time
from datetime import datetime, timezone

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from nilus_dagster.dagster.constants import (
    MODE_APPEND,
    MODE_TAG,
    PIPELINE_TAG,
    POSITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
)
from nilus_dagster.dagster.health import health_events, read_cursor, write_cursor
from nilus_dagster.dagster.partitions import sensor_partition_range
from nilus_dagster.dagster.resources import (
    NatsResource,
    NilusResourceKeys,
    SinkResource,
    engine_call,
)
from nilus_dagster.dagster.translator import DagsterNilusTranslator
from nilus_dagster.engine import LagReport, measure_lag_async
from nilus_dagster.errors import NilusError
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.redaction import redact

IN_FLIGHT_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
# How many in-flight runs to inspect for one that targets the asset without the pipeline tag
# (UI materializations, CLI backfills).
_IN_FLIGHT_SCAN = 200


def build_pipeline_job(
    pipeline: Pipeline,
    asset: dg.AssetsDefinition,
    *,
    translator: DagsterNilusTranslator | None = None,
) -> UnresolvedAssetJobDefinition:
    """The job the pipeline's sensor launches: its asset and checks, in process.

    A run is one async step, so a step subprocess would only add about 2 s to every run. The
    executor is the job's own: the code location's default executor, and with it every other
    asset of a project the pipelines are merged into, is left as it is.
    """
    translator = translator or DagsterNilusTranslator()
    return dg.define_asset_job(
        name=translator.get_job_name(pipeline),
        selection=dg.AssetSelection.assets(asset.key),
        executor_def=dg.in_process_executor,
        partitions_def=asset.partitions_def,
        tags={PIPELINE_TAG: pipeline.name},
        description=f"Ingests {pipeline.subject} into the table of {asset.key.to_user_string()}.",
    )


def sensor_interval_seconds(pipeline: Pipeline) -> int:
    """``spec.dagster.sensor_interval_seconds``, else the address ``timeout`` (rounded up)."""
    settings = pipeline.manifest.spec.dagster
    if settings.sensor_interval_seconds:
        return settings.sensor_interval_seconds
    return max(1, math.ceil(pipeline.manifest.source.address.timeout))


def build_nilus_sensor(
    pipeline: Pipeline,
    asset: dg.AssetsDefinition,
    *,
    translator: DagsterNilusTranslator | None = None,
    resource_keys: NilusResourceKeys | None = None,
    job: UnresolvedAssetJobDefinition | None = None,
) -> dg.SensorDefinition:
    """Build the sensor that keeps ``asset`` fresh.

    Starts RUNNING when the manifest says ``run_in_loop: true``, STOPPED otherwise. It uses the
    same ``nats`` and ``nilus_sink`` resources as the asset.

    Args:
        pipeline: The validated manifest.
        asset: The pipeline's asset (:func:`build_nilus_asset`).
        translator: How the pipeline appears in Dagster.
        resource_keys: The keys of the NATS and sink resources.
        job: The job its runs go to (:func:`build_pipeline_job`, which carries the executor);
            without one, runs target the asset under the code location's default executor.
    """
    translator = translator or DagsterNilusTranslator()
    keys = resource_keys or NilusResourceKeys()
    key = asset.key
    partitions_def = asset.partitions_def
    run_in_loop = pipeline.manifest.source.options.run_in_loop

    @dg.sensor(
        name=translator.get_sensor_name(pipeline),
        minimum_interval_seconds=sensor_interval_seconds(pipeline),
        default_status=(
            dg.DefaultSensorStatus.RUNNING if run_in_loop else dg.DefaultSensorStatus.STOPPED
        ),
        job=job,
        asset_selection=None if job is not None else [key],
        required_resource_keys={keys.nats, keys.sink},
        description=(
            f"Requests a run of {key.to_user_string()} when messages on {pipeline.subject} are "
            "not yet in the table and no run of it is in flight; records the lag every tick."
        ),
        tags={PIPELINE_TAG: pipeline.name},
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        nats = getattr(context.resources, keys.nats)
        sink = getattr(context.resources, keys.sink)
        return evaluate_tick(context, pipeline, key, partitions_def, nats, sink)

    return _sensor


def evaluate_tick(
    context: dg.SensorEvaluationContext,
    pipeline: Pipeline,
    key: dg.AssetKey,
    partitions_def: dg.PartitionsDefinition | None,
    nats: NatsResource,
    sink: SinkResource,
) -> dg.SensorResult:
    """One tick: measure, observe, and request a run when one is needed."""
    try:
        lag = probe_lag(pipeline, nats, sink)
    except asyncio.TimeoutError:
        return dg.SensorResult(
            skip_reason=f"{pipeline.name}: the lag probe did not finish within "
            f"{nats.probe_timeout:g}s (NATS or the table store answers too slowly); "
            "trying again next tick"
        )
    except NilusError as exc:
        return dg.SensorResult(
            skip_reason=f"{pipeline.name}: cannot measure the lag: {redact(exc)}"
        )

    records = read_cursor(context.cursor)
    events, records[pipeline.name] = health_events(
        pipeline, key, lag, records.get(pipeline.name), time.time()
    )
    cursor = write_cursor(records)
    problem = lag.problem
    if problem:
        # A recreated stream needs a person; a run would only fail the same way.
        return dg.SensorResult(
            skip_reason=f"{pipeline.name}: {redact(problem)}", asset_events=events, cursor=cursor
        )
    if not lag.pending:
        return dg.SensorResult(
            skip_reason=f"{pipeline.name}: up to date (position {lag.position}, stream last "
            f"sequence {lag.stream_last_seq})",
            asset_events=events,
            cursor=cursor,
        )
    in_flight = run_in_flight(context.instance, pipeline, key)
    if in_flight is not None:
        return dg.SensorResult(
            skip_reason=f"{pipeline.name}: {lag.sequence_lag} messages pending; run "
            f"{in_flight.run_id} is {in_flight.status.value}, the next tick looks again",
            asset_events=events,
            cursor=cursor,
        )
    tags = {PIPELINE_TAG: pipeline.name, MODE_TAG: MODE_APPEND, POSITION_TAG: str(lag.position)}
    if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        keys = sensor_partition_range(partitions_def, lag.lag_seconds, datetime.now(timezone.utc))
        if keys is not None:
            tags[RANGE_START_TAG] = keys.start
            tags[RANGE_END_TAG] = keys.end
    return dg.SensorResult(
        run_requests=[dg.RunRequest(asset_selection=[key], tags=tags)],
        asset_events=events,
        cursor=cursor,
    )


def probe_lag(pipeline: Pipeline, nats: NatsResource, sink: SinkResource) -> LagReport:
    """``measure_lag`` under the resources, with a hard bound on the whole probe.

    Raises:
        asyncio.TimeoutError: The probe took longer than ``nats.probe_timeout``.
        NilusError: The server is down, a placeholder is unset, the stream is missing...
    """
    call = engine_call(pipeline, nats, sink)
    # A sensor runs in a gRPC worker thread without an event loop: asyncio.run is safe here.
    return asyncio.run(
        asyncio.wait_for(
            measure_lag_async(
                call.pipeline,
                env=call.env,
                servers=call.servers,
                connect_timeout=nats.connect_timeout,
            ),
            timeout=nats.probe_timeout,
        )
    )


def run_in_flight(
    instance: dg.DagsterInstance, pipeline: Pipeline, key: dg.AssetKey
) -> dg.DagsterRun | None:
    """A queued or running run of the pipeline (by its tag, or by the asset it targets)."""
    tagged = instance.get_runs(
        filters=dg.RunsFilter(statuses=IN_FLIGHT_STATUSES, tags={PIPELINE_TAG: pipeline.name}),
        limit=1,
    )
    if tagged:
        return tagged[0]
    for run in instance.get_runs(
        filters=dg.RunsFilter(statuses=IN_FLIGHT_STATUSES), limit=_IN_FLIGHT_SCAN
    ):
        if run.asset_selection and key in run.asset_selection:
            return run
    return None
