"""The stream against the committed position, without consuming anything (sensors, `lag`)."""

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from nilus_dagster.engine.report import LagReport
from nilus_dagster.engine.settings import runtime_settings
from nilus_dagster.engine.table import check_stream_identity, open_sink, sink_call
from nilus_dagster.errors import PositionError
from nilus_dagster.jetstream import JetStreamSource
from nilus_dagster.jetstream.connection import DEFAULT_CONNECT_TIMEOUT_SECONDS
from nilus_dagster.manifest.loader import Pipeline

__all__ = ["measure_lag", "measure_lag_async"]


async def measure_lag_async(
    pipeline: Pipeline,
    *,
    env: Mapping[str, str] | None = None,
    servers: Sequence[str] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
) -> LagReport:
    """Compare the stream with the table's committed position.

    Bounded by ``connect_timeout``: a server that is down fails fast with a
    :class:`~nilus_dagster.errors.SourceError`.
    """
    settings = runtime_settings(pipeline, env=env, servers=servers)
    sink = open_sink(settings)
    with sink:
        state = await sink_call(sink.open)
        async with JetStreamSource(
            settings.address,
            pipeline.stream,
            servers=settings.servers,
            connect_timeout=connect_timeout,
        ) as source:
            stream = await source.stream_state()
            position = state.position
            problem = None
            try:
                check_stream_identity(pipeline, stream, position, state.stream_created)
            except PositionError as exc:
                problem = str(exc)
            pending = gap = 0
            if problem is None and position < stream.last_seq:
                pending = await source.pending_after(position)
                gap = await source.removed_after(position, stream)
        newest = await sink_call(sink.newest_timestamp) if state.exists else None
    return LagReport(
        stream=pipeline.stream,
        subject=settings.address.subject,
        position=position,
        stream_first_seq=stream.first_seq,
        stream_last_seq=stream.last_seq,
        sequence_lag=pending,
        gap=gap,
        lag_seconds=(datetime.now(timezone.utc) - newest).total_seconds() if newest else None,
        table_uri=settings.location.uri,
        problem=problem,
    )


def measure_lag(pipeline: Pipeline, **kwargs: object) -> LagReport:
    """Synchronous :func:`measure_lag_async` (sensors, the CLI)."""
    return asyncio.run(measure_lag_async(pipeline, **kwargs))  # type: ignore[arg-type]
