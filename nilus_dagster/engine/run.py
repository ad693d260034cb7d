"""One run of a pipeline: position -> pull -> decode -> commit -> report.

The sink is the only place the position lives. A run reads the committed position ``v``
through the writer it will commit through, pulls from ``v+1``, drops anything at or below the
position, and commits each chunk with the new position in the same transaction. Pulling
goes on while a chunk is decoded and committed in a worker thread.
"""

import asyncio
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ParamSpec

from nilus_dagster.engine.backfill import replay_window
from nilus_dagster.engine.committer import Committer
from nilus_dagster.engine.report import RunReport
from nilus_dagster.engine.settings import RuntimeSettings, runtime_settings
from nilus_dagster.engine.table import (
    check_stream_identity,
    identity_problem,
    open_sink,
    sink_call,
)
from nilus_dagster.jetstream import JetStreamSource, StreamState
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import SinkWriter

logger = logging.getLogger("nilus_dagster.engine")
P = ParamSpec("P")

_Committer = Committer  # the name the service and tests know

PART_ROWS = 16_384
"""Most messages decoded at a time while a commit's chunk fills (a quarter of the commit size
when that is smaller): decoding keeps pace with the pull instead of starting when the chunk is
full, so the end of a run waits for the last commit's write, not for its decoding too."""


@dataclass(frozen=True)
class Progress:
    """A progress tick: what a run has committed so far."""

    messages: int
    position: int
    target: int | None
    elapsed_seconds: float

    @property
    def messages_per_second(self) -> float:
        """Messages a second so far."""
        return self.messages / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


def _gc_frozen(run: Callable[P, Awaitable[RunReport]]) -> Callable[P, Awaitable[RunReport]]:
    """Freeze the objects alive when a run starts, for the length of the run.

    Everything alive then (modules, pyarrow, Dagster) outlives the run; frozen, the collector
    stops rescanning it while the pull churns through a Python object per message (measured: a
    tenth of a 200k-message run went to full collections).
    """

    @functools.wraps(run)
    async def frozen(*args: P.args, **kwargs: P.kwargs) -> RunReport:
        gc.freeze()
        try:
            return await run(*args, **kwargs)
        finally:
            gc.unfreeze()

    return frozen


@dataclass
class Ingestion:
    """An open pipeline: its settings, sink (the position), source, and what it committed.

    One run drains through one of these; a service keeps one open and drains again and again.
    """

    settings: RuntimeSettings
    sink: SinkWriter
    src: JetStreamSource
    committer: Committer
    started: float

    @property
    def position(self) -> int:
        """The last stream sequence committed to the table."""
        return self.sink.position

    def start_point(self, first: bool) -> tuple[int, datetime | None]:
        """Where the next pull starts: after the position, else the address's start.

        ``start_time`` only applies to the very first pull of a table with no position.
        """
        position = self.sink.position
        address = self.settings.address
        start_seq = position + 1 if position else (address.start_sequence or 1)
        start_time = (
            address.start_time if first and not position and not address.start_sequence else None
        )
        return start_seq, start_time


@asynccontextmanager
async def open_pipeline(
    pipeline: Pipeline,
    *,
    env: Mapping[str, str] | None = None,
    servers: Sequence[str] | None = None,
) -> AsyncIterator[tuple[RuntimeSettings, SinkWriter, JetStreamSource, StreamState]]:
    """Open the sink (read the position) and the source, and check they belong together.

    Raises:
        SourceError: NATS cannot be used (auth, stream, subject, server).
        PlaceholderError: A ``{VARIABLE}`` is not set.
        PositionError: The stream was recreated since the position was committed.
        SinkError: The table cannot be read.
    """
    settings = runtime_settings(pipeline, env=env, servers=servers)
    sink = open_sink(settings)
    with sink:
        # The table is read (and a database driver loaded and connected) while the source
        # connects and checks the stream: a short run's start-up is the longer of the two.
        opening = asyncio.ensure_future(asyncio.to_thread(sink.open))
        try:
            async with JetStreamSource(
                settings.address,
                pipeline.stream,
                servers=settings.servers,
                failover_timeout=settings.failover_timeout,
            ) as src:
                stream = await src.stream_state()
                await src.check_subject(stream)
                state = await opening
                if identity_problem(stream, state.position, state.stream_created):
                    # Read beside the sink, the stream may predate what another writer (a
                    # service run, when this is a backfill) committed before the position was
                    # read: only a stream read after the position can say it was recreated.
                    stream = await src.stream_state()
                check_stream_identity(pipeline, stream, state.position, state.stream_created)
                yield settings, sink, src, stream
        except BaseException:
            # The sink may not be closed under a thread still opening it; and when both sides
            # failed, the sink's error is the one to report, as when it was opened first.
            await asyncio.wait([opening])
            if not opening.cancelled() and opening.exception() is not None:
                raise opening.exception() from None  # type: ignore[misc]
            raise


async def log_gap(log: logging.Logger, run: "Ingestion", stream: StreamState, position: int) -> int:
    """The subject's sequences removed after ``position`` before ingestion (logged when any).

    Stream-wide retention and purges, and per-subject ones on a shared stream
    (``max_msgs_per_subject``, a purge by subject), without reading the stream.
    """
    gap = await run.src.removed_after(position, stream)
    if gap:
        log.warning(
            "%s: %d messages after sequence %d were removed by the stream's retention or a "
            "purge (of the stream, or of subject %s) before they were ingested; continuing "
            "with the next message still stored",
            run.settings.pipeline.name,
            gap,
            position,
            run.settings.address.subject,
        )
    return gap


@_gc_frozen
async def run_pipeline_async(
    pipeline: Pipeline,
    *,
    env: Mapping[str, str] | None = None,
    servers: Sequence[str] | None = None,
    drain: bool | None = None,
    max_messages: int | None = None,
    max_seconds: float | None = None,
    window: tuple[datetime, datetime] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    logger: logging.Logger | None = None,
) -> RunReport:
    """Run a pipeline once.

    Args:
        pipeline: The validated manifest.
        env: Environment for ``{PLACEHOLDER}``s (``os.environ`` by default).
        servers: Replace the address's servers (deployment override); ``NILUS_NATS_SERVERS``.
        drain: ``True``: commit everything pending when the run starts; ``False``: one batch.
            ``None`` follows ``run_in_loop``.
        max_messages: Stop after this many messages.
        max_seconds: Stop pulling after this long (what was pulled is committed).
        window: Replay the event-time window ``[start, end)`` up to the committed position and
            replace exactly its rows (a backfill); the position does not move.
        on_progress: Called after every commit.
        logger: Where to log (``nilus_dagster.engine`` by default).

    Returns:
        What the run committed and the stream's state after it.

    Raises:
        SourceError: NATS cannot be used (auth, stream, subject, server).
        PlaceholderError: A ``{VARIABLE}`` is not set.
        PositionError: The stream was recreated, or the window is older than the stream's
            retention.
        SinkError: The table cannot be written.
    """
    log = logger or globals()["logger"]
    started = time.monotonic()
    async with open_pipeline(pipeline, env=env, servers=servers) as (settings, sink, src, stream):
        if window is not None:
            return await replay_window(settings, sink, src, stream, window, started, log)
        run = Ingestion(
            settings, sink, src, Committer(sink, settings, stream.created.isoformat()), started
        )
        gap = await log_gap(log, run, stream, sink.position)
        start_seq, start_time = run.start_point(first=True)
        await src.align_durable(start_seq, start_time=start_time)
        drain = pipeline.manifest.source.options.run_in_loop if drain is None else drain
        batch_size = settings.address.batch_size
        limit = max_messages if drain else min(max_messages or batch_size, batch_size)
        await drain_to(
            run,
            start_seq,
            target=stream.last_seq,
            max_messages=limit,
            start_time=start_time,
            deadline=started + max_seconds if max_seconds else None,
            on_progress=on_progress,
        )
        report = await build_report(run, gap=gap, since=started)
    log.info(
        "%s: committed %d messages (%s..%s) in %.2fs, %.0f msg/s; position %d, lag %d",
        pipeline.name,
        report.messages,
        report.first_seq,
        report.last_seq,
        report.duration_seconds,
        report.messages_per_second,
        report.position,
        report.sequence_lag,
    )
    return report


async def drain_to(
    run: Ingestion,
    start_seq: int,
    *,
    target: int,
    max_messages: int | None = None,
    start_time: datetime | None = None,
    deadline: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """Pull from ``start_seq`` up to ``target`` and commit it all, in bounded commits.

    Args:
        run: The open pipeline.
        start_seq: First sequence to pull (``start_time`` wins when given).
        target: Last sequence to pull (the stream's last sequence when the drain starts).
        max_messages: Stop after this many messages.
        start_time: Pull from this stream time instead (a first run with ``start_time=``).
        deadline: ``time.monotonic()`` after which pulling stops; what was pulled is committed.
        on_progress: Called after every commit.
        stopping: Polled after every pulled batch; ``True`` stops pulling like the deadline.
    """
    if start_seq > target:
        return
    src, sink, committer = run.src, run.sink, run.committer
    position = sink.position
    options = run.settings.pipeline.manifest.sink.options
    max_rows, max_bytes = options.commit_max_rows, options.commit_max_bytes
    part_rows = max(1, min(PART_ROWS, max_rows // 4))

    chunk = MessageBatch()
    chunk_bytes = 0
    decoded_ahead = 0  # leading messages of ``chunk`` handed to prepare_part already
    in_flight: asyncio.Future[int] | None = None
    # One thread for all sink work: parts, commits and their order stay the pull's order.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nilus-commit")
    loop = asyncio.get_running_loop()

    async def flush(batch: MessageBatch) -> None:
        nonlocal in_flight
        if in_flight is not None:
            await _committed(src, in_flight)
        in_flight = loop.run_in_executor(worker, committer.commit, batch)
        in_flight.add_done_callback(lambda _: report_progress())

    def report_progress() -> None:
        if on_progress is not None:
            on_progress(
                Progress(committer.messages, sink.position, target, time.monotonic() - run.started)
            )

    try:
        async with aclosing(
            src.messages(
                start_seq, stop_at_seq=target, max_messages=max_messages, start_time=start_time
            )
        ) as batches:
            async for batch in batches:
                batch = batch.after(max(position, chunk.last_seq if len(chunk) else 0))
                if not len(batch):
                    continue
                chunk.extend(batch)
                chunk_bytes += batch.nbytes
                # Commits are bounded in rows and bytes whatever the pull size, so a busy
                # subject makes few large files and memory stays bounded by the commit size.
                while len(chunk) >= max_rows or chunk_bytes >= max_bytes:
                    # Under the byte bound the first max_rows messages fit whole; only over it
                    # are the sizes added up.
                    count = (
                        max_rows
                        if chunk_bytes < max_bytes
                        else min(max_rows, _fit(chunk, max_bytes))
                    )
                    ready, chunk = chunk.split(count)
                    chunk_bytes -= ready.nbytes
                    decoded_ahead = 0
                    await flush(ready)
                # What is left is within both bounds, so all of it belongs to the next
                # commit: decode it ahead in parts while the pull goes on. Parts are whole
                # multiples of part_rows, so the commit finds fewer than part_rows messages
                # not decoded (for PostgreSQL: not loaded) yet whatever the pull's batch size
                # (1,696 of the default 100,000), not up to a part plus a batch.
                ahead = (len(chunk) - decoded_ahead) // part_rows * part_rows
                if ahead:
                    part = chunk.slice(decoded_ahead, decoded_ahead + ahead)
                    decoded_ahead += ahead
                    loop.run_in_executor(worker, committer.prepare_part, part)
                if (deadline and time.monotonic() > deadline) or (stopping and stopping()):
                    break
        if len(chunk):
            await flush(chunk)
        if in_flight is not None:
            await _committed(src, in_flight)
    finally:
        # Normally idle by now; after a failure or a cancel, no sink work may outlive the
        # drain: a commit already running finishes (it is atomic), queued work is dropped.
        worker.shutdown(wait=True, cancel_futures=True)
        # After a failure or a cancel, rows written ahead of a commit that never came must
        # not ride along with a later one (a service drains again through the same sink).
        committer.drop_parts()


async def build_report(run: Ingestion, *, gap: int, since: float) -> RunReport:
    """The report of what ``run`` committed since ``since`` (``time.monotonic()``)."""
    src, sink, committer = run.src, run.sink, run.committer
    settings = run.settings
    final = await src.stream_state()
    position = sink.position
    sequence_lag = await src.pending_after(position) if position < final.last_seq else 0
    newest = committer.newest_ns
    row_count, estimated = await sink_call(sink.counted_rows)
    if newest is None:
        newest_ts = await sink_call(sink.newest_timestamp)
        lag_seconds = (
            (datetime.now(timezone.utc) - newest_ts).total_seconds() if newest_ts else None
        )
    else:
        lag_seconds = max(0.0, time.time() - newest / 1e9)
    return RunReport(
        pipeline=settings.pipeline.name,
        stream=settings.pipeline.stream,
        subject=settings.address.subject,
        table_uri=settings.location.uri,
        first_seq=committer.first_seq,
        last_seq=committer.last_seq,
        position=position,
        stream_last_seq=final.last_seq,
        sequence_lag=sequence_lag,
        lag_seconds=lag_seconds,
        gap=gap,
        row_count=row_count,
        rows_written=committer.rows,
        dead_letters=committer.dead,
        messages=committer.messages,
        bytes=committer.bytes,
        commits=committer.commits,
        duration_seconds=time.monotonic() - since,
        durable=src.spec.durable,
        realign_reasons=tuple(src.realign_reasons),
        row_count_estimated=estimated,
    )


def _fit(chunk: MessageBatch, max_bytes: int) -> int:
    """How many leading messages of ``chunk`` fit in ``max_bytes`` (at least one)."""
    total = 0
    for count, payload in enumerate(chunk.payloads):
        total += len(payload)
        if total > max_bytes:
            return max(count, 1)
    return len(chunk)


async def _committed(src: JetStreamSource, task: "asyncio.Future[int]") -> None:
    position = await task
    # The durable moves only after the data is committed, so the server's view never runs ahead.
    await src.mark_committed(position)


def run_pipeline(pipeline: Pipeline, **kwargs: object) -> RunReport:
    """Synchronous :func:`run_pipeline_async` (for the CLI and scripts)."""
    return asyncio.run(run_pipeline_async(pipeline, **kwargs))  # type: ignore[arg-type]
