"""Backfills: replay an event-time window from the stream and replace exactly its rows."""

import asyncio
import logging
import time
from datetime import datetime, timezone

from nilus_dagster.engine.report import RunReport
from nilus_dagster.engine.settings import RuntimeSettings
from nilus_dagster.errors import PositionError
from nilus_dagster.jetstream import JetStreamSource, StreamState
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import STREAM_CREATED_KEY, SinkWriter
from nilus_dagster.times import as_utc


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

    The position does not move, so running it twice changes nothing. A window that starts
    before the oldest message the stream still holds is refused: replaying it would delete rows
    that can no longer be brought back.

    Raises:
        PositionError: The window is older than the stream's retention.
    """
    pipeline = settings.pipeline
    start, end = (as_utc(w) for w in window)
    position = sink.position
    if stream.first_seq > 1 and stream.messages:
        oldest = await _first_message_time(src, stream.first_seq)
        if oldest is not None and start < oldest:
            raise PositionError(
                f"cannot backfill {start.isoformat()}..{end.isoformat()}: stream {stream.name} "
                f"now starts at sequence {stream.first_seq} ({oldest.isoformat()}); older "
                "messages were removed by retention, so replaying this window would lose rows. "
                "Choose windows that start after the stream's oldest message"
            )
    collected = MessageBatch()
    if position:
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
        await asyncio.to_thread(sink.prepare, collected, format=settings.address.format)
        if len(collected)
        else None
    )
    rows = decoded.rows if decoded is not None else None
    dead_count = decoded.dead_letters.num_rows if decoded is not None else 0
    # The window's dead letters were recorded when those messages were first ingested (the
    # dead-letter table is a log of what failed, under its own position); a replay counts them
    # but does not record them again.
    result = await asyncio.to_thread(
        sink.replace_window,
        rows,
        None,
        start=start,
        end=end,
        commit_metadata={
            STREAM_CREATED_KEY: stream.created.isoformat(),
            "nilus.pipeline": pipeline.name,
            "nilus.window": f"{start.isoformat()}/{end.isoformat()}",
        },
    )
    final = await src.stream_state()
    newest_ts = await asyncio.to_thread(sink.newest_timestamp)
    duration = time.monotonic() - started
    log.info(
        "%s: replaced window %s..%s with %d rows", pipeline.name, start, end, result.rows_written
    )
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
        row_count=await asyncio.to_thread(sink.row_count),
        rows_written=result.rows_written,
        dead_letters=dead_count,
        messages=len(collected),
        bytes=collected.nbytes,
        commits=1,
        duration_seconds=duration,
    )


async def _first_message_time(src: JetStreamSource, first_seq: int) -> datetime | None:
    async for batch in src.messages(first_seq, max_messages=1):
        return datetime.fromtimestamp(batch.timestamps_ns[0] / 1e9, tz=timezone.utc)
    return None
