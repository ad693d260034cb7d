"""The Arrow shape of rows and dead letters, shared by decoding and the Delta sink."""

from collections.abc import Sequence
from datetime import datetime, timezone

import pyarrow as pa

from nilus_dagster.messages import MessageBatch

METADATA_COLUMNS = ("_nats_subject", "_nats_seq", "_nats_timestamp", "_nats_headers")
"""The columns every row carries besides its payload fields."""

DATA_COLUMN = "_nats_data"
"""The raw payload: the only data column with ``format=raw``, and kept in every dead letter."""

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
# Delta stores microseconds; nanoseconds would need a table feature most readers lack.
HEADERS_TYPE = pa.map_(pa.string(), pa.string())

METADATA_FIELDS = (
    pa.field("_nats_subject", pa.string()),
    pa.field("_nats_seq", pa.uint64()),
    pa.field("_nats_timestamp", TIMESTAMP_TYPE),
    pa.field("_nats_headers", HEADERS_TYPE),
)
METADATA_SCHEMA = pa.schema(METADATA_FIELDS)

RAW_SCHEMA = pa.schema([pa.field(DATA_COLUMN, pa.binary()), *METADATA_FIELDS])
"""Rows of a ``format=raw`` pipeline."""

DEAD_LETTER_SCHEMA = pa.schema(
    [
        *METADATA_FIELDS,
        pa.field(DATA_COLUMN, pa.binary()),
        pa.field("error", pa.string()),
        pa.field("failed_at", TIMESTAMP_TYPE),
    ]
)
"""Rows of the dead-letter table ``<table>__dead_letters``."""

MAX_ERROR_CHARS = 1000
# Arrow quotes the offending value in its errors; a huge payload must not become a huge error.


def metadata_arrays(batch: MessageBatch, indices: Sequence[int] | None = None) -> list[pa.Array]:
    """The four metadata columns of ``batch`` (or of the messages at ``indices``), in order."""
    n = len(batch)
    subjects = batch.subjects
    if n and subjects[0] == subjects[-1] and subjects.count(subjects[0]) == n:
        # One subject for the whole batch is the common case: no per-row string building.
        subject = pa.repeat(pa.scalar(subjects[0], pa.string()), n)
    else:
        subject = pa.array(subjects, pa.string())
    seq = pa.array(batch.sequences, pa.uint64())
    timestamp = pa.array(batch.timestamps_ns, pa.timestamp("ns", tz="UTC")).cast(
        TIMESTAMP_TYPE, safe=False
    )
    if batch.headers is None:
        headers = pa.nulls(n, HEADERS_TYPE)
    else:
        headers = pa.array([list(h.items()) if h else None for h in batch.headers], HEADERS_TYPE)
    arrays = [subject, seq, timestamp, headers]
    if indices is not None and len(indices) != n:
        take = pa.array(indices, pa.int64())
        arrays = [a.take(take) for a in arrays]
    return arrays


def truncate_error(text: str) -> str:
    """``text`` on one line, cut to :data:`MAX_ERROR_CHARS`."""
    text = " ".join(str(text).split())
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return text[: MAX_ERROR_CHARS - 15] + " ...(truncated)"


def dead_letter_table(
    batch: MessageBatch,
    failures: Sequence[tuple[int, str]],
    *,
    failed_at: datetime | None = None,
) -> pa.Table:
    """Dead letters for the messages of ``batch`` at the given indices, with their errors.

    Args:
        batch: The batch the failed messages came from.
        failures: ``(index in batch, error text)`` pairs, in batch order.
        failed_at: When they failed (now by default).
    """
    if not failures:
        return DEAD_LETTER_SCHEMA.empty_table()
    indices = [i for i, _ in failures]
    when = failed_at or datetime.now(timezone.utc)
    n = len(indices)
    columns = [
        *metadata_arrays(batch, indices),
        pa.array([batch.payloads[i] for i in indices], pa.binary()),
        pa.array([truncate_error(e) for _, e in failures], pa.string()),
        pa.repeat(pa.scalar(when, TIMESTAMP_TYPE), n),
    ]
    return pa.Table.from_arrays(columns, schema=DEAD_LETTER_SCHEMA)


def nesting_depth(dtype: pa.DataType) -> int:
    """How many struct, list and map levels ``dtype`` has (0 for a plain value).

    Iterative: Arrow reads a payload nested a few hundred levels deep (under the bracket count
    that guards Arrow itself) into a type this deep, and recursing over it raised
    RecursionError, failing the whole run instead of making the payload a dead letter.
    """
    deepest = 0
    stack = [(dtype, 0)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if pa.types.is_struct(current):
            stack.extend((current.field(i).type, depth + 1) for i in range(current.num_fields))
            deepest = max(deepest, depth + 1)
        elif pa.types.is_map(current):
            stack.extend(((current.key_type, depth + 1), (current.item_type, depth + 1)))
        elif (
            pa.types.is_list(current)
            or pa.types.is_large_list(current)
            or pa.types.is_fixed_size_list(current)
            or pa.types.is_list_view(current)
            or pa.types.is_large_list_view(current)
        ):
            stack.append((current.value_type, depth + 1))
    return deepest
