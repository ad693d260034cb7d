"""Sink writers: decode batches to Arrow, write them exactly once, dead letters aside.

No Dagster here. :class:`~nilus_dagster.sink.writer.SinkWriter` is what the engine writes
through, whatever the store: :func:`~nilus_dagster.sink.factory.sink_writer` picks the writer
from the resolved location's kind. :func:`~nilus_dagster.sink.decode.decode` (shared by every
writer) turns a :class:`~nilus_dagster.messages.MessageBatch` into Arrow rows and dead letters;
each writer conforms them to its table and commits them with the stream position in the same
transaction. :class:`~nilus_dagster.sink.delta.DeltaSink` keeps the position in a Delta ``txn``.
"""

from typing import TYPE_CHECKING, Any

from nilus_dagster.sink.decode import BatchDecoder, Decoded, decode
from nilus_dagster.sink.factory import WRITERS, read_table_schema, sink_writer, writer_class
from nilus_dagster.sink.schema import DEAD_LETTER_SCHEMA, METADATA_COLUMNS
from nilus_dagster.sink.writer import (
    STREAM_CREATED_KEY,
    CommitResult,
    PositionConflict,
    SinkState,
    SinkWriter,
    TableFacts,
)

if TYPE_CHECKING:
    from nilus_dagster.sink.delta import DeltaSink


def __getattr__(name: str) -> Any:
    # deltalake is imported when a Delta table is written, not by every process that imports
    # the sink layer (a PostgreSQL run pays ~0.05 s less start-up).
    if name == "DeltaSink":
        from nilus_dagster.sink.delta import DeltaSink

        return DeltaSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEAD_LETTER_SCHEMA",
    "METADATA_COLUMNS",
    "STREAM_CREATED_KEY",
    "WRITERS",
    "BatchDecoder",
    "CommitResult",
    "Decoded",
    "DeltaSink",
    "PositionConflict",
    "SinkState",
    "SinkWriter",
    "TableFacts",
    "decode",
    "read_table_schema",
    "sink_writer",
    "writer_class",
]
