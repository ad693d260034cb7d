"""The pipeline's table as a run and a lag check both see it.

Its sink, and whether the committed position still belongs to the stream that is there now.
"""

from datetime import datetime

from nilus_dagster.engine.settings import RuntimeSettings
from nilus_dagster.errors import PositionError
from nilus_dagster.jetstream import StreamState
from nilus_dagster.manifest.loader import Pipeline
from nilus_dagster.sink import DeltaSink


def open_sink(settings: RuntimeSettings) -> DeltaSink:
    """The pipeline's Delta sink (not opened yet)."""
    options = settings.pipeline.manifest.sink.options
    return DeltaSink(
        settings.location,
        app_id=settings.pipeline.app_id,
        strategy=options.incremental_strategy,
        primary_key=options.primary_key,
        create_table=options.create_table,
        compact_every=options.compact_every,
        checkpoint_every=options.checkpoint_every,
    )


def check_stream_identity(
    pipeline: Pipeline, stream: StreamState, position: int, stored_created: str | None
) -> None:
    """Refuse a stream that was deleted and recreated since the position was committed.

    Raises:
        PositionError: The position is past the stream's end, or its creation time changed.
    """
    created = datetime.fromisoformat(stored_created) if stored_created else None
    problem = stream.recreated_since(position, created)
    if problem:
        raise PositionError(
            f"{problem}; its sequences start over. To ingest the new stream, write to a new "
            f"dest_table, or delete the table at "
            f"{pipeline.table_location(fill_secrets=False).uri}"
        )
