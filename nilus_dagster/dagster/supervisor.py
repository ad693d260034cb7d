"""The supervisor sensor of a service group: keep exactly one service run alive.

Each tick:

* a service run queued or running, with a fresh heartbeat: nothing to do;
* a running one silent for four heartbeats (``spec.dagster.service.heartbeat_seconds``; its
  worker was killed without telling Dagster): it is marked failed, with the reason, and
  replaced;
* none: after a failed run, wait (``RETRY_SECONDS`` doubled per failure in a row, at most
  ``RETRY_MAX_SECONDS``), saying on the tick why and until when; otherwise start one.

While no service run is alive it also probes each pipeline's lag and records it the way the
per-tick sensor does (:mod:`nilus_dagster.dagster.health`): the UI keeps its lag figures
through a backoff. A running service reports them itself.
"""

import asyncio
import time

import dagster as dg

from nilus_dagster.dagster.constants import (
    HEARTBEAT_TAG,
    MODE_SERVICE,
    MODE_TAG,
    SERVICE_TAG,
)
from nilus_dagster.dagster.health import health_events, read_cursor, write_cursor
from nilus_dagster.dagster.resources import NatsResource, SinkResource
from nilus_dagster.dagster.sensor import IN_FLIGHT_STATUSES, probe_lag
from nilus_dagster.dagster.service import ServiceGroup
from nilus_dagster.errors import NilusError
from nilus_dagster.redaction import redact

SUPERVISOR_INTERVAL_SECONDS = 10
HEALTH_BUDGET_SECONDS = 20.0
"""Most time one tick spends probing lags (each probe is bounded by the NATS resource)."""
RETRY_SECONDS = 30.0
QUEUED_TOO_LONG_SECONDS = 60.0
"""A service run queued longer than this gets an explanation on the supervisor's tick."""
RETRY_MAX_SECONDS = 900.0
_RECENT_RUNS = 20


def supervisor_interval_seconds(group: ServiceGroup) -> int:
    """The smallest ``spec.dagster.sensor_interval_seconds`` of the group, else 10 s."""
    chosen = [
        p.manifest.spec.dagster.sensor_interval_seconds
        for p in group.pipelines
        if p.manifest.spec.dagster.sensor_interval_seconds
    ]
    return min(chosen) if chosen else SUPERVISOR_INTERVAL_SECONDS


def build_service_sensor(
    group: ServiceGroup,
    job: dg.JobDefinition,
    *,
    nats_key: str = "nats",
    sink_key: str = "nilus_sink",
) -> dg.SensorDefinition:
    """The supervisor sensor of ``group``'s service runs (RUNNING by default).

    It probes the lag through the NATS and sink resources under ``nats_key`` and ``sink_key``.
    """
    names = ", ".join(p.name for p in group.pipelines)

    @dg.sensor(
        name=group.sensor_name,
        job=job,
        minimum_interval_seconds=supervisor_interval_seconds(group),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Keeps one service run of {names} alive: starts one when none is queued or "
            "running, backs off after failures, replaces a run whose worker died."
        ),
        tags={SERVICE_TAG: group.name},
        required_resource_keys={nats_key, sink_key},
    )
    def _supervisor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        nats = getattr(context.resources, nats_key)
        sink = getattr(context.resources, sink_key)
        return supervise(context, group, job.name, nats, sink)

    return _supervisor


def supervise(
    context: dg.SensorEvaluationContext,
    group: ServiceGroup,
    job_name: str,
    nats: NatsResource,
    sink: SinkResource,
    now: float | None = None,
) -> dg.SensorResult:
    """One supervisor tick (see the module docstring)."""
    instance = context.instance
    now = time.time() if now is None else now
    alive = instance.get_run_records(
        filters=dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT_STATUSES), limit=5
    )
    replaced: list[str] = []
    for record in alive:
        run = record.dagster_run
        if run.status != dg.DagsterRunStatus.STARTED:
            return dg.SensorResult(
                skip_reason=_not_started(run, now - record.create_timestamp.timestamp()),
                cursor=context.cursor,
            )
        beat = (
            _float(run.tags.get(HEARTBEAT_TAG))
            or record.start_time
            or record.create_timestamp.timestamp()
        )
        silent = now - beat
        if silent <= group.dead_after_seconds:
            return dg.SensorResult(
                skip_reason=f"service run {run.run_id} is running (heartbeat {silent:.0f}s ago)",
                cursor=context.cursor,
            )
        reason = (
            f"no heartbeat from service run {run.run_id} for {silent:.0f}s (more than "
            f"{group.dead_after_seconds:g}s): its worker is gone; marking it failed and starting "
            "another"
        )
        context.log.warning(reason)
        instance.report_run_failed(run, message=reason)
        replaced.append(run.run_id)

    if not replaced:
        waiting = _backoff(instance, job_name, now)
        if waiting is not None:
            events, cursor = _health(context, group, nats, sink, now)
            return dg.SensorResult(skip_reason=waiting, asset_events=events, cursor=cursor)
    tags = {MODE_TAG: MODE_SERVICE, SERVICE_TAG: group.name}
    if replaced:
        tags["nilus/replaces"] = replaced[0]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(job_name=job_name, tags=tags)], cursor=context.cursor
    )


def _not_started(run: dg.DagsterRun, age: float) -> str:
    """Why there is nothing to do about a run that is not running yet (or any more)."""
    said = f"service run {run.run_id} is {run.status.value}"
    if run.status == dg.DagsterRunStatus.QUEUED and age > QUEUED_TOO_LONG_SECONDS:
        # A service run holds its run slot for its whole life: a fleet of groups can fill the
        # instance's run queue (QueuedRunCoordinator's max_concurrent_runs, 10 by default), and
        # the runs over the limit would wait silently.
        said += (
            f" for {age:.0f}s: the instance's run queue may be full (each service run holds a "
            "slot of run_queue.max_concurrent_runs for its whole life; raise it, or carry more "
            "pipelines per run with spec.dagster.service.max_pipelines)"
        )
    return said


def _backoff(instance: dg.DagsterInstance, job_name: str, now: float) -> str | None:
    """Why and how long to wait before the next service run, or ``None`` to start one now."""
    recent = instance.get_run_records(filters=dg.RunsFilter(job_name=job_name), limit=_RECENT_RUNS)
    failed = []
    for record in recent:
        if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
            break
        failed.append(record)
    if not failed:
        return None
    wait = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** (len(failed) - 1))
    last = failed[0]
    ended = last.end_time or last.update_timestamp.timestamp()
    if now >= ended + wait:
        return None
    return (
        f"service run {last.dagster_run.run_id} failed ({_failure_reason(instance, last)}); "
        f"{len(failed)} failure(s) in a row, next attempt in {ended + wait - now:.0f}s "
        f"(backoff {wait:g}s)"
    )


def _failure_reason(instance: dg.DagsterInstance, record: dg.RunRecord) -> str:
    from dagster._core.events import DagsterEventType

    for entry in reversed(
        instance.all_logs(
            record.dagster_run.run_id,
            of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE},
        )
    ):
        event = entry.dagster_event
        if event is None:
            continue
        data = event.event_specific_data
        error = getattr(data, "error", None)
        text = error.message.strip() if error is not None else (event.message or "")
        if text:
            return redact(text.splitlines()[0])[:300]
    return "no reason recorded"


def _health(
    context: dg.SensorEvaluationContext,
    group: ServiceGroup,
    nats: NatsResource,
    sink: SinkResource,
    now: float,
) -> tuple[list[dg.AssetObservation | dg.AssetCheckEvaluation], str | None]:
    """Lag figures of the group's pipelines while no service run reports them."""
    records = read_cursor(context.cursor)
    events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
    began = time.monotonic()
    for pipeline, key in zip(group.pipelines, group.keys, strict=True):
        if time.monotonic() - began > HEALTH_BUDGET_SECONDS:
            # Far inside Dagster's 60 s tick limit; the next tick measures the others.
            context.log.info("lag probes of the other pipelines left for the next tick")
            break
        try:
            lag = probe_lag(pipeline, nats, sink)
        except (NilusError, asyncio.TimeoutError) as exc:
            context.log.warning(f"{pipeline.name}: cannot measure the lag: {redact(exc)}")
            continue
        found, records[pipeline.name] = health_events(
            pipeline, key, lag, records.get(pipeline.name), now
        )
        events += found
    return events, write_cursor(records)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
