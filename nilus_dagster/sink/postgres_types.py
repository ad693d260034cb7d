"""Arrow columns as PostgreSQL columns: the type mapping, jsonb text built column-wise, names.

Nested values (structs, lists, maps, the headers) become ``jsonb``. Their JSON text is built with
Arrow compute functions over whole columns, never a Python object per value, and sent in
``jsonb``'s binary COPY form (a version byte, then the text), so the bulk load writes them
straight into the table.
"""

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from nilus_dagster.errors import SinkError
from nilus_dagster.sink.schema import TIMESTAMP_TYPE

if TYPE_CHECKING:
    from nilus_dagster.messages import MessageBatch
    from nilus_dagster.sink.decode import Decoded

MAX_IDENTIFIER_BYTES = 63
"""PostgreSQL truncates longer names (NAMEDATALEN - 1): two names could become one."""

JSONB = "jsonb"
_JSONB_VERSION = b"\x01"
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'

_PG_TO_ARROW: dict[str, pa.DataType] = {
    "boolean": pa.bool_(),
    "smallint": pa.int64(),
    "integer": pa.int64(),
    "bigint": pa.int64(),
    "real": pa.float64(),
    "double precision": pa.float64(),
    "numeric": pa.float64(),
    "text": pa.string(),
    "character varying": pa.string(),
    "character": pa.string(),
    "bytea": pa.binary(),
    "timestamp with time zone": TIMESTAMP_TYPE,
    "timestamp without time zone": TIMESTAMP_TYPE,
    "date": pa.date32(),
    "json": pa.string(),
    "jsonb": pa.string(),
}


def quote(name: str) -> str:
    """``name`` as a quoted identifier: reserved words, mixed case and ``-`` kept as written."""
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, table: str) -> str:
    """``"schema"."table"``."""
    return f"{quote(schema)}.{quote(table)}"


def too_long(name: str) -> bool:
    """Whether PostgreSQL would truncate ``name``."""
    return len(name.encode("utf-8")) > MAX_IDENTIFIER_BYTES


def check_identifier(name: str, what: str, fix: str) -> None:
    """Refuse a name PostgreSQL would truncate.

    Raises:
        SinkError: ``name`` is longer than 63 bytes; the message says which name and the fix.
    """
    if too_long(name):
        raise SinkError(
            f"{what} {name!r} is {len(name.encode('utf-8'))} bytes long; PostgreSQL keeps "
            f"{MAX_IDENTIFIER_BYTES} bytes of a name and would truncate it: {fix}"
        )


def postgres_type(dtype: pa.DataType) -> str | None:
    """The column type for an Arrow type, ``None`` for the null type (no value seen yet)."""
    if pa.types.is_null(dtype):
        return None
    if pa.types.is_boolean(dtype):
        return "boolean"
    if pa.types.is_integer(dtype):
        return "bigint"
    if pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return "double precision"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "text"
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return "bytea"
    if pa.types.is_timestamp(dtype):
        return "timestamp with time zone"
    if pa.types.is_date(dtype):
        return "date"
    if pa.types.is_nested(dtype):
        return JSONB
    return "text"


def arrow_type(pg_type: str) -> pa.DataType:
    """The Arrow type rows are conformed to for a column of ``pg_type``."""
    return _PG_TO_ARROW.get(pg_type, pa.string())


def column_for(array: pa.ChunkedArray, pg_type: str) -> pa.ChunkedArray:
    """``array`` in the form the bulk load writes into a ``pg_type`` column."""
    dtype = array.type
    if pg_type in (JSONB, "json"):
        text = json_text(array)
        if pg_type == "json":
            return text
        return pc.binary_join_element_wise(
            pa.scalar(_JSONB_VERSION, pa.binary()), text.cast(pa.binary()), b""
        )
    if pa.types.is_unsigned_integer(dtype) or (pa.types.is_integer(dtype) and dtype != pa.int64()):
        return array.cast(pa.int64())
    if pa.types.is_timestamp(dtype) and dtype != TIMESTAMP_TYPE:
        return array.cast(TIMESTAMP_TYPE)
    if pa.types.is_decimal(dtype) or (pa.types.is_floating(dtype) and dtype != pa.float64()):
        return array.cast(pa.float64())
    return array


def json_text(array: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """Each value as JSON text (a null stays a SQL null), built column-wise."""
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    out = []
    for chunk in chunks:
        if chunk.null_count == len(chunk):
            # Usually _nats_headers, null for every message without headers: no text to build.
            out.append(pa.nulls(len(chunk), pa.string()))
            continue
        text = _json(chunk)
        out.append(pc.if_else(chunk.is_null(), pa.scalar(None, pa.string()), text))
    return pa.chunked_array(out, pa.string())


def _json(array: pa.Array) -> pa.Array:
    """JSON text of every element (``null`` for nulls): the recursive core of json_text."""
    dtype = array.type
    null = pa.scalar("null", pa.string())
    if pa.types.is_null(dtype):
        return pa.repeat(null, len(array))
    if pa.types.is_boolean(dtype):
        text = pc.if_else(array, "true", "false")
    elif pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        text = array.cast(pa.string())
        if pa.types.is_floating(dtype):
            # NaN and infinities have no JSON spelling.
            finite = pc.is_finite(array)
            text = pc.if_else(finite, text, null)
    elif pa.types.is_decimal(dtype):
        text = array.cast(pa.string())
    elif pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        text = _quoted(array.cast(pa.string()))
    elif pa.types.is_temporal(dtype):
        text = _quoted(_iso_text(array))
    elif pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        hexed = [None if v is None else v.hex() for v in array.to_pylist()]
        text = _quoted(pa.array(hexed, pa.string()))  # typed: all nulls would be null-typed
    elif pa.types.is_map(dtype):
        keys = _quoted(array.keys.cast(pa.string()))  # type: ignore[attr-defined]
        values = _json(array.items)  # type: ignore[attr-defined]
        pairs = pc.binary_join_element_wise(keys, values, ":")
        text = _wrap(_rejoin(array, pairs), "{", "}")
    elif pa.types.is_struct(dtype):
        # One join over '{"a":', a, ',"b":', b, '}' rather than a join per field.
        pieces: list[Any] = []
        for i in range(dtype.num_fields):
            name = ("{" if i == 0 else ",") + json.dumps(dtype.field(i).name) + ":"
            pieces += [pa.scalar(name, pa.string()), _json(array.field(i))]  # type: ignore[attr-defined]
        if not pieces:
            return pa.repeat(pa.scalar("{}", pa.string()), len(array))
        text = pc.binary_join_element_wise(*pieces, pa.scalar("}", pa.string()), "")
    elif pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        values = _json(array.values)  # type: ignore[attr-defined]
        text = _wrap(_rejoin(array, values), "[", "]")
    else:
        text = _quoted(array.cast(pa.string()))
    if array.null_count:
        # A null struct or list still has (meaningless) children: its text is replaced.
        return pc.if_else(array.is_null(), null, text)
    return text


def _rejoin(array: pa.Array, elements: pa.Array) -> pa.Array:
    """``elements`` (one per list element) regrouped by ``array``'s offsets, comma-joined."""
    offsets = array.offsets  # type: ignore[attr-defined]
    start = offsets[0].as_py()
    if start:
        offsets = pc.subtract(offsets, start)
    length = offsets[-1].as_py() if len(offsets) else 0
    kind = pa.LargeListArray if pa.types.is_large_list(offsets.type) else pa.ListArray
    grouped = kind.from_arrays(offsets, elements.slice(start, length))
    return pc.binary_join(grouped, ",")


def _wrap(body: pa.Array, left: str, right: str) -> pa.Array:
    return pc.binary_join_element_wise(
        pa.scalar(left, pa.string()), body, pa.scalar(right, pa.string()), ""
    )


def _quoted(text: pa.Array) -> pa.Array:
    needs = pc.match_substring_regex(text, _NEEDS_ESCAPE)
    if pc.any(needs).as_py():
        # Quotes, backslashes and control characters are rare in values: only those values
        # go through json.dumps.
        escaped = [
            json.dumps(v)[1:-1] if v is not None and n else v
            for v, n in zip(text.to_pylist(), needs.to_pylist(), strict=True)
        ]
        text = pa.array(escaped, pa.string())
    return _wrap(text, '"', '"')


def _iso_text(array: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(array.type):
        return pc.strftime(array, "%Y-%m-%dT%H:%M:%SZ" if array.type.tz else "%Y-%m-%dT%H:%M:%S")
    return array.cast(pa.string())


def without_long_names(decoded: "Decoded", batch: "MessageBatch") -> "Decoded":
    """Make dead letters of the messages carrying a field name PostgreSQL would truncate.

    Such a name cannot be a column; the other messages are kept without that field.
    """
    from nilus_dagster.sink.decode import Decoded
    from nilus_dagster.sink.schema import dead_letter_table

    rows = decoded.rows
    long = [name for name in rows.column_names if too_long(name)]
    if not long:
        return decoded
    carries = pc.is_valid(rows.column(long[0]))
    for name in long[1:]:
        carries = pc.or_(carries, pc.is_valid(rows.column(name)))
    index = {seq: i for i, seq in enumerate(batch.sequences)}
    error = (
        f"field name(s) {', '.join(repr(n) for n in long)} longer than PostgreSQL's "
        f"{MAX_IDENTIFIER_BYTES}-byte limit: shorten the field in the messages"
    )
    seqs = rows.filter(carries).column("_nats_seq").to_pylist()
    dead = dead_letter_table(batch, [(index[seq], error) for seq in seqs])
    if decoded.dead_letters.num_rows:
        dead = pa.concat_tables([decoded.dead_letters, dead])
    return Decoded(rows.filter(pc.invert(carries)).drop_columns(long), dead)
