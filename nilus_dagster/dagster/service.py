"""Service runs: one long-lived run keeps a group of pipelines ingesting and reports as it goes.

The pipelines whose run mode is ``service`` (``spec.dagster.run_mode``, by default those with
``run_in_loop: true``) are grouped by their Dagster group, at most
``spec.dagster.service.max_pipelines`` to a run. Each group gets a job of one op that serves
them all in one event loop (:func:`~nilus_dagster.engine.serve_pipelines_async`) and, at each
pipeline's cadence, logs a materialization of its asset with the run metadata and the three
check results. A pipeline that fails logs a failed ``sequence_lag_within_bound`` check with
the error and is tried again after a backoff; the others go on.

The run ends by itself after ``spec.dagster.service.run_seconds``; on Dagster's terminate
(SIGINT from the code server, or SIGTERM from a run launcher) it stops pulling, commits what it
pulled, reports, and ends as canceled. It records a heartbeat in a run tag, which the group's
supervisor sensor (:mod:`nilus_dagster.dagster.supervisor`) reads to replace a run whose
worker died without telling Dagster.

The service job takes no concurrency pool: window backfills and UI materializations of the
same assets run beside it (their replays only touch rows at or below the position they read,
and retry when the service commits in between).
"""

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

from nilus_dagster.dagster.checks import check_results
from nilus_dagster.dagster.constants import (
    CHECK_SEQUENCE_LAG,
    HEARTBEAT_TAG,
    MODE_SERVICE,
    MODE_TAG,
    PID_TAG,
    SERVICE_TAG,
)
from nilus_dagster.dagster.metadata import run_metadata
from nilus_dagster.dagster.partitions import build_partitions_def
from nilus_dagster.dagster.resources import NatsResource, SinkResource, engine_call
from nilus_dagster.dagster.translator import DagsterNilusTranslator, dagster_name
from nilus_dagster.engine import RunReport, ServiceFailure, serve_pipelines_async
from nilus_dagster.manifest.loader import Pipeline

DEAD_AFTER_BEATS = 4
"""A service run silent for this many heartbeats is taken for dead."""


@dataclass(frozen=True)
class ServiceGroup:
    """Pipelines that one service run carries.

    Attributes:
        name: Unique among groups: the Dagster group, with ``_2``, ``_3``... when it is split.
        pipelines: The pipelines, in manifest order.
        keys: Their asset keys, in the same order.
    """

    name: str
    pipelines: tuple[Pipeline, ...]
    keys: tuple[dg.AssetKey, ...]

    @property
    def job_name(self) -> str:
        """The group's service job: ``nilus_service_<group>``."""
        return dagster_name(f"nilus_service_{self.name}")

    @property
    def sensor_name(self) -> str:
        """The group's supervisor sensor."""
        return dagster_name(f"nilus_service_{self.name}_supervisor")

    @property
    def run_seconds(self) -> float:
        """How long a service run lives: the shortest ``run_seconds`` of its pipelines."""
        return min(p.manifest.spec.dagster.service.run_seconds for p in self.pipelines)

    @property
    def heartbeat_seconds(self) -> float:
        """How often a service run beats: the shortest ``heartbeat_seconds`` of its pipelines."""
        return min(p.manifest.spec.dagster.service.heartbeat_seconds for p in self.pipelines)

    @property
    def dead_after_seconds(self) -> float:
        """Heartbeat silence after which the run's worker is taken for dead."""
        return DEAD_AFTER_BEATS * self.heartbeat_seconds


def service_groups(
    pipelines: Sequence[Pipeline], translator: DagsterNilusTranslator | None = None
) -> list[ServiceGroup]:
    """The service-mode pipelines, grouped by Dagster group, split to ``max_pipelines``."""
    translator = translator or DagsterNilusTranslator()
    by_group: dict[str, list[Pipeline]] = {}
    for pipeline in pipelines:
        if pipeline.run_mode == "service":
            by_group.setdefault(translator.get_group_name(pipeline), []).append(pipeline)
    groups = []
    for group, members in by_group.items():
        size = min(p.manifest.spec.dagster.service.max_pipelines for p in members)
        for n, start in enumerate(range(0, len(members), size)):
            chunk = tuple(members[start : start + size])
            groups.append(
                ServiceGroup(
                    name=group if n == 0 else f"{group}_{n + 1}",
                    pipelines=chunk,
                    keys=tuple(translator.get_asset_key(p) for p in chunk),
                )
            )
    return groups


class ServiceRunConfig(dg.Config):
    """Optional launch-time settings of a service run (the launchpad's ``ops`` config)."""

    run_seconds: float | None = Field(
        default=None,
        gt=0,
        description="End after N seconds (default: spec.dagster.service.run_seconds).",
    )


def build_service_job(
    group: ServiceGroup, *, nats_key: str = "nats", sink_key: str = "nilus_sink"
) -> dg.JobDefinition:
    """The job whose one op serves ``group``'s pipelines until it ends or is terminated.

    The op needs the NATS and sink resources (under ``nats_key`` and ``sink_key``), like the
    assets.
    """
    names = ", ".join(p.name for p in group.pipelines)

    @dg.op(
        name=dagster_name(f"{group.job_name}_op"),
        description=f"Keeps {names} ingesting; reports each at its cadence.",
        required_resource_keys={nats_key, sink_key},
    )
    async def _serve(context: dg.OpExecutionContext, config: ServiceRunConfig) -> None:
        nats = getattr(context.resources, nats_key)
        sink = getattr(context.resources, sink_key)
        await serve_group(context, group, config, nats, sink)

    @dg.job(
        name=group.job_name,
        description=f"Service run of {names}: one long-lived run that ingests and reports.",
        tags={MODE_TAG: MODE_SERVICE, SERVICE_TAG: group.name},
        executor_def=dg.in_process_executor,
    )
    def _job() -> None:
        _serve()

    return _job


async def serve_group(
    context: dg.OpExecutionContext,
    group: ServiceGroup,
    config: ServiceRunConfig,
    nats: NatsResource,
    sink: SinkResource,
) -> None:
    """Serve ``group`` until its time is up or the run is terminated.

    Raises:
        DagsterExecutionInterruptedError: After a terminate, once everything pulled is
            committed and reported, so that the run ends as canceled.
    """
    calls = [engine_call(p, nats, sink) for p in group.pipelines]
    by_name = {c.pipeline.name: (c.pipeline, key) for c, key in zip(calls, group.keys, strict=True)}
    stop = asyncio.Event()
    signalled: list[int] = []
    restore = _stop_on_signals(asyncio.get_running_loop(), stop, signalled)
    heartbeat = asyncio.create_task(_heartbeat(context, stop, group.heartbeat_seconds))
    try:
        summaries = await serve_pipelines_async(
            [c.pipeline for c in calls],
            stop=stop,
            run_seconds=config.run_seconds or group.run_seconds,
            env=calls[0].env,
            servers=calls[0].servers,
            on_report=_reporter(context, by_name),
            on_failure=_failure_reporter(context, by_name),
            logger=context.log,
        )
    finally:
        stop.set()
        heartbeat.cancel()
        restore()
    for summary in summaries:
        context.log.info(
            f"{summary.pipeline}: {summary.messages} messages in {summary.commits} commits, "
            f"position {summary.position}, ended by {summary.ended_by}"
            + (f", {len(summary.failures)} failed attempt(s)" if summary.failures else "")
        )
    if signalled:
        raise dg.DagsterExecutionInterruptedError(
            f"terminated (signal {signalled[0]}): everything pulled was committed and reported"
        )


def _reporter(
    context: dg.OpExecutionContext, by_name: dict[str, tuple[Pipeline, dg.AssetKey]]
) -> Callable[[RunReport], None]:
    partitions = {name: build_partitions_def(p) for name, (p, _) in by_name.items()}

    def report(result: RunReport) -> None:
        pipeline, key = by_name[result.pipeline]
        context.log_event(
            dg.AssetMaterialization(
                asset_key=key,
                metadata=run_metadata(result),
                partition=_newest_window(partitions[result.pipeline], result),
            )
        )
        for check in check_results(pipeline, key, result):
            context.log_event(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name=check.check_name or "",
                    passed=check.passed,
                    metadata=check.metadata,
                    severity=check.severity,
                    description=check.description,
                )
            )

    return report


def _newest_window(
    partitions_def: dg.TimeWindowPartitionsDefinition | None, result: RunReport
) -> str | None:
    """The window of the newest committed message: the partition the report materializes."""
    if partitions_def is None or result.lag_seconds is None:
        return None
    try:
        return partitions_def.get_partition_key_for_timestamp(time.time() - result.lag_seconds)
    except Exception:  # before the first window: the report is unpartitioned
        return None


def _failure_reporter(
    context: dg.OpExecutionContext, by_name: dict[str, tuple[Pipeline, dg.AssetKey]]
) -> Callable[[ServiceFailure], None]:
    def fail(failure: ServiceFailure) -> None:
        _, key = by_name[failure.pipeline]
        then = (
            f"; trying again in {failure.retry_in:g}s"
            if failure.retry_in is not None
            else "; the next service run tries again"
        )
        context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=key,
                check_name=CHECK_SEQUENCE_LAG,
                passed=False,
                metadata={
                    "nilus/error": dg.MetadataValue.text(failure.message),
                    "nilus/attempt": dg.MetadataValue.int(failure.attempt),
                },
                description=f"ingestion failed: {failure.message}{then}",
            )
        )

    return fail


def _stop_on_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, signalled: list[int]
) -> Callable[[], None]:
    """Turn SIGINT/SIGTERM into ``stop`` while the service runs; returns the undo.

    Dagster's terminate reaches the run worker as SIGINT (the code server) or SIGTERM (a run
    launcher); its own handler would raise inside whatever the loop is doing and abandon the
    commit in flight, so the service takes them over and stops at a batch boundary instead.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in wanted}

    def on_signal(sig: int) -> None:
        if not signalled:
            signalled.append(sig)
        stop.set()

    for sig in wanted:
        loop.add_signal_handler(sig, on_signal, sig)

    def restore() -> None:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)

    return restore


async def _heartbeat(context: dg.OpExecutionContext, stop: asyncio.Event, every: float) -> None:
    """Record the run worker's pid once and a heartbeat every ``every`` seconds."""
    instance, run_id = context.instance, context.run_id
    tags = {PID_TAG: str(os.getpid())}
    while not stop.is_set():
        tags[HEARTBEAT_TAG] = str(int(time.time()))
        try:
            await asyncio.to_thread(instance.add_run_tags, run_id, tags)
        except Exception as exc:  # a missed beat is not worth ending the service for
            context.log.warning(f"could not record the service heartbeat: {exc}")
        tags = {}
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
