"""A long-lived service: several pipelines kept ingesting in one event loop, reporting as they go.

Each pipeline keeps one sink and one source open and drains what is pending again and again
(the run's own ``drain_to``: bounded commits, the position in the same Delta transaction), and
calls back a report of what it committed since the last one at a bounded cadence. The service
ends by itself after ``run_seconds`` or when ``stop`` is set: the pull stops at the next batch,
what was pulled is committed (or, after ``stop_grace_seconds``, abandoned: a commit already
running finishes atomically), so nothing is lost and nothing is written twice.

A pipeline that fails is reported through ``on_failure`` and tried again after a capped
exponential backoff; the other pipelines go on.
"""

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from nilus_dagster.engine.committer import Committer
from nilus_dagster.engine.report import RunReport
from nilus_dagster.engine.run import (
    Ingestion,
    build_report,
    drain_to,
    log_gap,
    open_pipeline,
)
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.redaction import redact

logger = logging.getLogger("nilus_dagster.engine")


@dataclass(frozen=True)
class ServiceOptions:
    """How one pipeline is served (from ``spec.dagster.service`` by :meth:`for_pipeline`).

    Attributes:
        report_every_seconds: Report at least this often while anything is committed, and
            this often anyway (the lag figures stay current).
        report_every_commits: Report after this many commits, if sooner.
        poll_seconds: How long a caught-up pipeline waits before it looks for new messages.
        retry_seconds: First wait after a failure; doubled after each failure in a row.
        retry_max_seconds: The longest wait between attempts.
    """

    report_every_seconds: float = 60.0
    report_every_commits: int = 100
    poll_seconds: float = 1.0
    retry_seconds: float = 5.0
    retry_max_seconds: float = 300.0

    @classmethod
    def for_pipeline(cls, pipeline: Pipeline, **overrides: float) -> "ServiceOptions":
        """The options ``spec.dagster.service`` sets, with ``overrides`` on top."""
        settings = pipeline.manifest.spec.dagster.service
        values: dict[str, float] = {
            "report_every_seconds": settings.report_every_seconds,
            "report_every_commits": settings.report_every_commits,
            "poll_seconds": settings.poll_seconds,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ServiceFailure:
    """One failed attempt of a served pipeline.

    Attributes:
        pipeline: The pipeline's name.
        error: What was raised.
        message: The error's text, redacted, with the pipeline's name.
        attempt: How many attempts in a row failed, this one included.
        retry_in: Seconds until the next attempt, ``None`` when the service ends first.
    """

    pipeline: str
    error: BaseException
    message: str
    attempt: int
    retry_in: float | None


@dataclass
class ServiceSummary:
    """What a service did for one pipeline over its whole life."""

    pipeline: str
    messages: int = 0
    commits: int = 0
    reports: int = 0
    failures: list[str] = field(default_factory=list)
    position: int | None = None
    ended_by: str = "time"


async def serve_pipelines_async(
    pipelines: Sequence[Pipeline],
    *,
    stop: asyncio.Event | None = None,
    run_seconds: float | None = None,
    options: Mapping[str, ServiceOptions] | None = None,
    env: Mapping[str, str] | None = None,
    servers: Sequence[str] | None = None,
    on_report: Callable[[RunReport], None] | None = None,
    on_failure: Callable[[ServiceFailure], None] | None = None,
    stop_grace_seconds: float = 10.0,
    logger: logging.Logger | None = None,
) -> list[ServiceSummary]:
    """Keep ``pipelines`` ingesting concurrently until ``run_seconds`` pass or ``stop`` is set.

    Args:
        pipelines: The validated manifests (distinct names).
        stop: Set it to end the service (a terminate, SIGTERM).
        run_seconds: How long the service lives; default the smallest
            ``spec.dagster.service.run_seconds`` of the pipelines.
        options: Per pipeline name; default :meth:`ServiceOptions.for_pipeline`.
        env: Environment for ``{PLACEHOLDER}``s (``os.environ`` by default).
        servers: Replace the addresses' servers (deployment override).
        on_report: Called with each pipeline's report of what it committed since its last.
        on_failure: Called when a pipeline's attempt fails (it is tried again later).
        stop_grace_seconds: After ``stop``, how long pipelines may take to commit what they
            pulled before the rest is abandoned (it stays in the stream, after the position).
        logger: Where to log (``nilus_dagster.engine`` by default).

    Returns:
        One summary per pipeline, in order.
    """
    log = logger or globals()["logger"]
    stop = stop or asyncio.Event()
    if run_seconds is None:
        run_seconds = min(p.manifest.spec.dagster.service.run_seconds for p in pipelines)
    deadline = time.monotonic() + run_seconds
    summaries = [ServiceSummary(p.name) for p in pipelines]
    tasks = [
        asyncio.create_task(
            _serve_pipeline(
                pipeline,
                summary,
                stop=stop,
                deadline=deadline,
                options=(options or {}).get(pipeline.name) or ServiceOptions.for_pipeline(pipeline),
                env=env,
                servers=servers,
                on_report=on_report,
                on_failure=on_failure,
                log=log,
            ),
            name=f"nilus-serve-{pipeline.name}",
        )
        for pipeline, summary in zip(pipelines, summaries, strict=True)
    ]
    # Everything alive now outlives the service; frozen, the collector stops rescanning it.
    gc.freeze()
    try:
        pending = await _until_stopped(tasks, stop, stop_grace_seconds)
        for task in pending:
            task.cancel()
        for task, summary in zip(tasks, summaries, strict=True):
            if task in pending:
                summary.ended_by = "abandoned"
        await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        gc.unfreeze()
    return summaries


def serve_pipelines(pipelines: Sequence[Pipeline], **kwargs: object) -> list[ServiceSummary]:
    """Synchronous :func:`serve_pipelines_async`."""
    return asyncio.run(serve_pipelines_async(pipelines, **kwargs))  # type: ignore[arg-type]


async def _until_stopped(
    tasks: list["asyncio.Task[None]"], stop: asyncio.Event, grace: float
) -> set["asyncio.Task[None]"]:
    """Wait for every task; once ``stop`` is set, give them ``grace`` seconds more.

    Returns:
        The tasks still running after the grace.
    """
    stopped = asyncio.create_task(stop.wait())
    try:
        remaining = set(tasks)
        while remaining:
            done, _ = await asyncio.wait(remaining | {stopped}, return_when="FIRST_COMPLETED")
            remaining -= done
            if stopped in done:
                break
        if not remaining:
            return set()
        _, pending = await asyncio.wait(remaining, timeout=grace)
        return pending
    finally:
        stopped.cancel()


async def _serve_pipeline(
    pipeline: Pipeline,
    summary: ServiceSummary,
    *,
    stop: asyncio.Event,
    deadline: float,
    options: ServiceOptions,
    env: Mapping[str, str] | None,
    servers: Sequence[str] | None,
    on_report: Callable[[RunReport], None] | None,
    on_failure: Callable[[ServiceFailure], None] | None,
    log: logging.Logger,
) -> None:
    """Serve one pipeline; a failed attempt is reported and tried again after a backoff."""
    failures_in_a_row = 0
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            await _serve_once(
                pipeline, summary, stop, deadline, options, env, servers, on_report, log
            )
            summary.ended_by = "stop" if stop.is_set() else "time"
            return
        except Exception as exc:  # one pipeline's failure never ends the others
            failures_in_a_row += 1
            wait = min(
                options.retry_max_seconds, options.retry_seconds * 2 ** (failures_in_a_row - 1)
            )
            retry_in = wait if time.monotonic() + wait < deadline else None
            message = f"{pipeline.name}: {redact(exc)}"
            summary.failures.append(message)
            log.error(
                "%s%s",
                message,
                f"; trying again in {wait:g}s" if retry_in is not None else "",
            )
            if on_failure is not None:
                on_failure(ServiceFailure(pipeline.name, exc, message, failures_in_a_row, retry_in))
            if retry_in is None:
                summary.ended_by = "failed"
                return
            await _wait(stop, wait)
    summary.ended_by = "stop" if stop.is_set() else "time"


async def _serve_once(
    pipeline: Pipeline,
    summary: ServiceSummary,
    stop: asyncio.Event,
    deadline: float,
    options: ServiceOptions,
    env: Mapping[str, str] | None,
    servers: Sequence[str] | None,
    on_report: Callable[[RunReport], None] | None,
    log: logging.Logger,
) -> None:
    async with open_pipeline(pipeline, env=env, servers=servers) as (settings, sink, src, stream):
        started = time.monotonic()
        committer = Committer(sink, settings, stream.created.isoformat())
        run = Ingestion(settings, sink, src, committer, started)
        gap = await log_gap(log, run, stream, sink.position)
        gap_checked = (stream.first_seq, sink.position)
        # Sequences the stream no longer stores, all subjects: it only grows with a removal.
        removed_checked = stream.last_seq - stream.messages
        start_seq, start_time = run.start_point(first=True)
        await src.align_durable(start_seq, start_time=start_time)
        drained_to: int | None = None
        report_since = started
        first = True

        async def report() -> None:
            nonlocal gap, report_since
            now = time.monotonic()
            result = await build_report(run, gap=gap, since=report_since)
            summary.messages += result.messages
            summary.commits += result.commits
            summary.reports += 1
            summary.position = result.position
            committer.reset_tally()
            gap, report_since = 0, now
            if summary.reports == 1:
                # A run's pipelines start together and would report in the same moment every
                # interval, their Dagster events written one after another on this loop while
                # no pipeline polls. The first interval is drawn at random to spread them.
                report_since -= random.uniform(0, options.report_every_seconds)
            if on_report is not None:
                on_report(result)

        try:
            while not stop.is_set() and time.monotonic() < deadline:
                stream = await src.stream_state()
                position = sink.position
                if stream.last_seq != drained_to and stream.last_seq > position:
                    # Checked again only for a new position and after a removal: with no
                    # removal since the last check, a message missing after the position was
                    # missing then too and counted then. Each check costs a shared stream two
                    # direct reads.
                    removed = stream.last_seq - stream.messages
                    if (stream.first_seq, position) != gap_checked and removed != removed_checked:
                        gap += await log_gap(log, run, stream, position)
                        gap_checked, removed_checked = (stream.first_seq, position), removed
                    start_seq, start_time = run.start_point(first=first)
                    await drain_to(
                        run,
                        start_seq,
                        target=stream.last_seq,
                        start_time=start_time,
                        deadline=deadline,
                        stopping=stop.is_set,
                    )
                    drained_to, first = stream.last_seq, False
                    summary.position = sink.position
                elapsed = time.monotonic() - report_since
                if (
                    elapsed >= options.report_every_seconds
                    or committer.commits >= options.report_every_commits
                    # The first commit is reported at once: a new run shows it is ingesting.
                    or (committer.commits and not summary.reports)
                ):
                    await report()
                if stream.last_seq == drained_to:
                    await _wait(stop, min(options.poll_seconds, deadline - time.monotonic()))
        finally:
            if committer.commits or gap:
                # What was committed since the last report is reported on the way out, even
                # after a failure: it is in the table.
                try:
                    await asyncio.shield(report())
                except Exception as exc:
                    log.warning("%s: the last report failed: %s", pipeline.name, redact(exc))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set."""
    if seconds <= 0:
        return
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
