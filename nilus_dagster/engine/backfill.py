"""Backfills: replay an event-time window from the stream and replace exactly its rows."""

import asyncio
import logging
import random
import time
from datetime import datetime, timedelta, timezone

from nilus_dagster.engine.report import RunReport
from nilus_dagster.engine.settings import RuntimeSettings
from nilus_dagster.engine.table import sink_call
from nilus_dagster.jetstream import JetStreamSource, StreamState
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import STREAM_CREATED_KEY, PositionConflict, SinkWriter
from nilus_dagster.times import as_utc

WINDOW_COMMIT_ATTEMPTS = 20
"""How often a window replacement is tried again after another writer committed first."""


async def replay_window(
    settings: RuntimeSettings,
    sink: SinkWriter,
    src: JetStreamSource,
    stream: StreamState,
    window: tuple[datetime, datetime],
    started: float,
    log: logging.Logger,
) -> RunReport:
    """Replay ``[start, end)`` up to the committed position and replace exactly those rows.

    The position does not move, so running it twice changes nothing. The part of the window
    older than the oldest message the stream still holds is skipped with a warning, and its
    rows are kept: replaying it would delete rows that can no longer be brought back. So a
    backfill of "all partitions" never fails because retention dropped the old ones.
    """
    pipeline = settings.pipeline
    start, end = (as_utc(w) for w in window)
    position = sink.position
    if stream.first_seq > 1 and stream.messages:
        oldest = await _first_message_time(src, stream.first_seq)
        if oldest is not None and start < oldest:
            log.warning(
                "%s: skipping %s..%s of the window: stream %s now starts at sequence %d (%s); "
                "older messages were removed by retention, so their rows are kept as they are",
                pipeline.name,
                start.isoformat(),
                min(oldest, end).isoformat(),
                stream.name,
                stream.first_seq,
                oldest.isoformat(),
            )
            start = min(oldest, end)
    collected = MessageBatch()
    if position and start < end:
        end_ns = end.timestamp() * 1e9
        async for batch in src.messages(1, stop_at_seq=position, start_time=start):
            keep = [
                i
                for i, ts in enumerate(batch.timestamps_ns)
                if batch.sequences[i] <= position and ts < end_ns
            ]
            if keep:
                collected.extend(batch.select(keep))
            if batch.last_seq >= position or batch.timestamps_ns[-1] >= end_ns:
                break
    decoded = (
        await sink_call(sink.prepare, collected, format=settings.address.format)
        if len(collected)
        else None
    )
    rows = decoded.rows if decoded is not None else None
    dead_count = decoded.dead_letters.num_rows if decoded is not None else 0
    # The window's dead letters were recorded when those messages were first ingested (the
    # dead-letter table is a log of what failed, under its own position); a replay counts them
    # but does not record them again.
    rows_written = 0
    if start < end:  # else the whole window is older than the stream's retention
        metadata = {
            STREAM_CREATED_KEY: stream.created.isoformat(),
            "nilus.pipeline": pipeline.name,
            "nilus.window": f"{start.isoformat()}/{end.isoformat()}",
        }
        for attempt in range(1, WINDOW_COMMIT_ATTEMPTS + 1):
            try:
                result = await sink_call(
                    sink.replace_window,
                    rows,
                    None,
                    start=start,
                    end=end,
                    up_to=position,
                    commit_metadata=metadata,
                )
                break
            except PositionConflict:
                # A service run (or another run) committed since the table was read. Its rows
                # are after ``position`` and the replacement leaves them alone, so the same rows
                # are committed again through a fresh snapshot.
                if attempt == WINDOW_COMMIT_ATTEMPTS:
                    raise
                log.info(
                    "%s: a concurrent commit moved the table; replacing the window again",
                    pipeline.name,
                )
                await asyncio.sleep(random.uniform(0.05, 0.3) * attempt)
                await sink_call(sink.open)
        rows_written = result.rows_written
    final = await src.stream_state()
    newest_ts = await sink_call(sink.newest_timestamp)
    duration = time.monotonic() - started
    log.info("%s: replaced window %s..%s with %d rows", pipeline.name, start, end, rows_written)
    row_count, estimated = await sink_call(sink.counted_rows)
    return RunReport(
        pipeline=pipeline.name,
        stream=pipeline.stream,
        subject=settings.address.subject,
        table_uri=settings.location.uri,
        first_seq=collected.first_seq if len(collected) else None,
        last_seq=collected.last_seq if len(collected) else None,
        position=position,
        stream_last_seq=final.last_seq,
        sequence_lag=await src.pending_after(position) if position < final.last_seq else 0,
        lag_seconds=(datetime.now(timezone.utc) - newest_ts).total_seconds() if newest_ts else None,
        gap=0,
        row_count=row_count,
        rows_written=rows_written,
        dead_letters=dead_count,
        messages=len(collected),
        bytes=collected.nbytes,
        commits=1,
        duration_seconds=duration,
        row_count_estimated=estimated,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


async def _first_message_time(src: JetStreamSource, first_seq: int) -> datetime | None:
    async for batch in src.messages(first_seq, max_messages=1):
        # Floored to the microsecond exactly (the table's precision): a float division can
        # land a hair after the message's own timestamp and leave it out of the window.
        return _EPOCH + timedelta(microseconds=batch.timestamps_ns[0] // 1000)
    return None
