"""The Delta Lake side: decode batches to Arrow, write them exactly once, dead letters aside.

No Dagster here. :func:`~nilus_dagster.sink.decode.decode` turns a
:class:`~nilus_dagster.messages.MessageBatch` into Arrow rows and dead letters;
:class:`~nilus_dagster.sink.delta.DeltaSink` conforms them to the table and commits them with the
stream position (a Delta ``txn``) in the same transaction.
"""

from nilus_dagster.sink.decode import BatchDecoder, Decoded, decode
from nilus_dagster.sink.delta import (
    STREAM_CREATED_KEY,
    CommitResult,
    DeltaSink,
    PositionConflict,
    SinkState,
)
from nilus_dagster.sink.schema import DEAD_LETTER_SCHEMA, METADATA_COLUMNS

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "METADATA_COLUMNS",
    "STREAM_CREATED_KEY",
    "BatchDecoder",
    "CommitResult",
    "Decoded",
    "DeltaSink",
    "PositionConflict",
    "SinkState",
    "decode",
]
