"""The pipeline's table as a run and a lag check both see it.

Its sink, the one way the engine calls it from the event loop, and whether the committed
position still belongs to the stream that is there now.
"""

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import ParamSpec, TypeVar

from nilus_dagster.engine.settings import RuntimeSettings
from nilus_dagster.errors import PositionError, SinkError
from nilus_dagster.jetstream import StreamState
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.sink import SinkWriter, sink_writer

P = ParamSpec("P")
T = TypeVar("T")


async def sink_call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in a worker thread; when cancelled, returns only once it did.

    A sink's connection is not for two threads at once, and a thread cannot be stopped: after a
    cancel, the caller goes on to report or to close the sink, which must not overlap a call
    still running in the thread. The cancel is raised once the call is over.
    """
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        while not call.done():
            try:
                await asyncio.wait([call])
            except asyncio.CancelledError:
                continue  # cancelled again: the call still has to end first
        raise


def open_sink(settings: RuntimeSettings) -> SinkWriter:
    """The pipeline's sink writer, for the store its address resolved to (not opened yet)."""
    pipeline = settings.pipeline
    try:
        return sink_writer(
            settings.location, pipeline.manifest.sink.options, app_id=pipeline.app_id
        )
    except SinkError as exc:  # the options or the store's library: the manifest says which
        raise SinkError(f"{pipeline.path}: {exc}") from None


def check_stream_identity(
    pipeline: Pipeline, stream: StreamState, position: int, stored_created: str | None
) -> None:
    """Refuse a stream that was deleted and recreated since the position was committed.

    Raises:
        PositionError: The position is past the stream's end, or its creation time changed.
    """
    problem = identity_problem(stream, position, stored_created)
    if problem:
        raise PositionError(
            f"{problem}; its sequences start over. To ingest the new stream, write to a new "
            f"dest_table, or delete the table at "
            f"{pipeline.table_location(fill_secrets=False).uri}"
        )


def identity_problem(stream: StreamState, position: int, stored_created: str | None) -> str | None:
    """Why ``stream`` looks like another stream than the one ``position`` was read from."""
    created = datetime.fromisoformat(stored_created) if stored_created else None
    return stream.recreated_since(position, created)
