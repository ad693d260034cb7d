"""MessageBatch -> Arrow: one Arrow JSON read for the whole batch, dead letters for the rest.

The happy path joins the payloads with newlines and reads them with Arrow's JSON reader in one
call: no Python object per message. Only when that read fails (or a cheap check says it could
misalign rows) does the slow path look closer: payloads that are not JSON objects are found
with cheap checks and ``json``, the remainder is bisected with Arrow so that the rows Arrow
rejects (a type that conflicts with earlier rows of the batch, nesting too deep for Delta)
become dead letters while every good row of the batch is kept.
"""

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from nilus_dagster.manifest.address import PayloadFormat
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.conform import split_conflicts
from nilus_dagster.sink.json_types import (
    as_json_types,
    group_by_types,
    merge_hints,
    string_overrides,
    value_depth,
    with_valid_null_lists,
)
from nilus_dagster.sink.lines import join_lines
from nilus_dagster.sink.schema import (
    DATA_COLUMN,
    DEAD_LETTER_SCHEMA,
    METADATA_COLUMNS,
    METADATA_FIELDS,
    METADATA_SCHEMA,
    RAW_SCHEMA,
    dead_letter_table,
    metadata_arrays,
    nesting_depth,
)

MAX_NESTING = 32
"""Deepest struct/list nesting a row may have; Delta rejects table schemas much deeper."""

# Arrow's JSON reader recurses per nesting level and crashes the process on very deep input
# (measured: fine at 15k levels, segfault at 20k). A payload with fewer opening brackets than
# this cannot be deeper, so only longer payloads with more brackets are checked with `json`
# (whose own recursion limit is far lower) before Arrow sees them.
_ARROW_SAFE_BRACKETS = 2000

_HINT_SAMPLE_BYTES = 64 << 10  # first lines of a first batch read to learn string hints
_MIN_BLOCK = 4 << 20  # several blocks per commit-sized batch let Arrow parse on both cores
# A failed part of at most this many rows is checked row by row with `json`, then re-read
# without the malformed ones; valid rows Arrow still rejects are halved down to single reads.
_CHECK_RANGE = 2048
_SMALL_RANGE = 32
_RAW, _VALID, _GROUPED = 0, 1, 2  # how far a failed part of the slow path was examined


@dataclass(frozen=True)
class Decoded:
    """A decoded batch.

    Attributes:
        rows: One row per good message, in stream order: the payload's top-level fields, then
            the metadata columns (``format=raw``: ``_nats_data`` then the metadata columns).
        dead_letters: One row per message that could not become a row
            (:data:`~nilus_dagster.sink.schema.DEAD_LETTER_SCHEMA`).
    """

    rows: pa.Table
    dead_letters: pa.Table


class BatchDecoder:
    """Decodes batches of one pipeline; keeps what it learnt about the payloads' fields.

    Arrow reads ISO-8601-looking strings as timestamps, which would make a field's type depend
    on how each batch happened to format its values (and drop the text's UTC offset). Strings
    stay strings: the fields where Arrow inferred a timestamp are re-read as strings, and the
    decoder remembers them so later batches are read right the first time.

    Args:
        format: ``json`` parses payloads into columns; ``raw`` keeps them as binary
            ``_nats_data``.
        max_nesting: Deepest struct/list nesting a row may have before it is a dead letter.
    """

    def __init__(self, format: PayloadFormat = "json", *, max_nesting: int = MAX_NESTING):
        if format not in ("json", "raw"):
            raise ValueError(f"format must be json or raw, got {format!r}")
        self.format = format
        self.max_nesting = max_nesting
        self._hints: pa.Schema | None = None
        self._sampled = False

    def decode(self, batch: MessageBatch, table_schema: pa.Schema | None = None) -> Decoded:
        """Turn ``batch`` into rows and dead letters. Never raises for a bad payload.

        Args:
            batch: The messages.
            table_schema: The destination table's schema, if it exists. When the messages of
                the batch disagree on a field's type, the rows that disagree with the table
                are the dead letters (without a table, the batch's earliest rows decide).
        """
        if self.format == "raw":
            return _decode_raw(batch)
        if not len(batch):
            return Decoded(METADATA_SCHEMA.empty_table(), DEAD_LETTER_SCHEMA.empty_table())
        table = self._fast(batch.payloads)
        if table is not None:
            return Decoded(_with_metadata(table, batch, None), DEAD_LETTER_SCHEMA.empty_table())
        return self._slow(batch, table_schema)

    # -- happy path ----------------------------------------------------------------------------

    def _fast(self, payloads: Sequence[bytes]) -> pa.Table | None:
        n = len(payloads)
        lines = join_lines(payloads)
        if lines is None:
            return None
        joined, longest, ascii = lines
        if not ascii:
            try:
                joined.decode("utf-8")  # Arrow checks string values but not field names
            except UnicodeDecodeError:
                return None
        if longest > _ARROW_SAFE_BRACKETS and any(_many_brackets(p) for p in payloads):
            return None
        try:
            table = self._read(joined, longest)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return None
        # One line per payload: row i is payload i unless a line held two objects (more rows).
        if table.num_rows != n or _too_deep(table.schema, self.max_nesting):
            return None
        return table

    def _read(self, joined: bytes, longest: int) -> pa.Table:
        """One Arrow read; fields Arrow takes for timestamps are read again as strings."""
        read_options = pj.ReadOptions(block_size=max(_MIN_BLOCK, 2 * longest + 2))
        if not self._sampled and len(joined) > 4 * _HINT_SAMPLE_BYTES:
            self._sampled = True
            cut = joined.rfind(b"\n", 0, _HINT_SAMPLE_BYTES)  # whole lines only
            if cut > 0:
                self._learn_hints(joined[:cut])
        table = pj.read_json(
            io.BytesIO(joined), read_options=read_options, parse_options=self._parse_options()
        )
        overrides = string_overrides(table.schema)
        if overrides is not None:
            self._hints = merge_hints(self._hints, overrides)
            table = pj.read_json(
                io.BytesIO(joined), read_options=read_options, parse_options=self._parse_options()
            )
        if self._hints is not None:
            # A hinted field none of these payloads has comes back as an all-null column.
            absent = [
                f.name
                for f in self._hints
                if f.name in table.column_names
                and table.column(f.name).null_count == table.num_rows
            ]
            if absent:
                table = table.drop_columns(absent)
        try:
            table.validate()
        except pa.ArrowInvalid:
            if _too_deep(table.schema, self.max_nesting):
                return table  # refused for its depth by every caller; nothing to repair
            # pyarrow 26 collapses the leading nulls of a list whose element type it learns
            # after them ([null, 1] gives a child of one value): an invalid table that failed
            # the run, and every re-run. Read again with the types it inferred: then it fills
            # lists in order. Lists of nulls only stay short either way and are padded. Still
            # invalid: ArrowInvalid, and the callers narrow it down to a dead letter.
            options = pj.ParseOptions(
                explicit_schema=table.schema, unexpected_field_behavior="infer"
            )
            table = pj.read_json(
                io.BytesIO(joined), read_options=read_options, parse_options=options
            )
            table = with_valid_null_lists(table)
            table.validate()
        return table

    def _learn_hints(self, sample: bytes) -> None:
        """Learn the timestamp-looking fields from the first lines of a decoder's first batch.

        Without hints, a batch whose fields Arrow takes for timestamps is read twice (the
        second time with those fields as strings): for a decoder's first batch, a fresh one
        every run, that was a whole second read of up to 16k messages. Reading a few hundred
        lines first finds the usual case; a field that only looks like a timestamp further
        down still gets the second read. A sample Arrow cannot read teaches nothing.
        """
        try:
            found = pj.read_json(io.BytesIO(sample))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return
        overrides = string_overrides(found.schema)
        if overrides is not None:
            self._hints = merge_hints(self._hints, overrides)

    def _parse_options(self) -> pj.ParseOptions:
        if self._hints is None:
            return pj.ParseOptions()
        return pj.ParseOptions(explicit_schema=self._hints, unexpected_field_behavior="infer")

    # -- slow path -----------------------------------------------------------------------------

    def _slow(self, batch: MessageBatch, table_schema: pa.Schema | None) -> Decoded:
        failures: dict[int, str] = {}
        lines: list[bytes] = []
        indices: list[int] = []
        for i, payload in enumerate(batch.payloads):
            if (
                payload[:1] != b"{"
                or b"\n" in payload
                or b"\r" in payload
                or (len(payload) > _ARROW_SAFE_BRACKETS and _many_brackets(payload))
                or not payload.isascii()
            ):
                error = validate_payload(payload)
                if error is not None:
                    failures[i] = error
                    continue
                # A raw line break in valid JSON can only be whitespace between tokens (JSON
                # strings may not hold one), so flattening a pretty-printed payload is exact.
                payload = payload.replace(b"\r", b" ").replace(b"\n", b" ")
            lines.append(payload)
            indices.append(i)
        parts, bad = self._bisect(lines, as_json_types(table_schema))
        for position, error in bad:
            failures[indices[position]] = error
        good = [i for i in range(len(batch)) if i not in failures]
        if not parts:
            rows = pa.table({})
        else:
            rows = pa.concat_tables([t for _, t in parts], promote_options="permissive")
            # Parts grouped by type can come out of stream order; put rows back in order.
            positions = pa.array([p for part, _ in parts for p in part], pa.int64())
            if len(parts) > 1:
                rows = rows.take(pc.sort_indices(positions))
        dead = dead_letter_table(batch, sorted(failures.items()))
        return Decoded(_with_metadata(rows, batch, good), dead)

    def _bisect(
        self, lines: list[bytes], schema: pa.Schema | None
    ) -> tuple[list[tuple[list[int], pa.Table]], list[tuple[int, str]]]:
        """Read ``lines`` in as few Arrow reads as the bad ones allow.

        Returns ``(line indices, table)`` for the parts read and ``(line index, error)`` for
        the bad lines. A field's type is decided by ``schema`` (the table's), else by the
        earliest good rows; a row whose value's type cannot be merged with it is a dead letter.

        A part that fails is halved; once small, its lines are checked with `json` (malformed
        ones are dead letters) and the valid ones grouped by the JSON types of their fields, so
        that messages of two shapes are read as two parts rather than one line at a time.
        """
        parts: list[tuple[list[int], pa.Table]] = []
        bad: list[tuple[int, str]] = []
        parsed: dict[int, object] = {}
        stack: list[tuple[list[int], int]] = [(list(range(len(lines))), _RAW)] if lines else []
        while stack:
            part, state = stack.pop()
            table, error, merged, rejected = self._try([lines[i] for i in part], schema)
            if table is not None:
                rejected_at = {j for j, _ in rejected}
                parts.append(([i for j, i in enumerate(part) if j not in rejected_at], table))
                schema = merged
                bad.extend((part[j], text) for j, text in rejected)
                continue
            if len(part) == 1:
                bad.append((part[0], validate_payload(lines[part[0]]) or error or "unreadable"))
                continue
            if state == _RAW and len(part) > _CHECK_RANGE:
                stack.extend(_halves(part, _RAW))
            elif state == _RAW:
                valid = []
                for i in part:
                    value, problem = _parse(lines[i])
                    if problem is None:
                        # Deeper than a row may be: a dead letter now, before the shape
                        # helpers below recurse into it (RecursionError at ~500 levels).
                        depth = value_depth(value)
                        if depth > self.max_nesting:
                            problem = (
                                f"payload is nested {depth} levels deep (at most "
                                f"{self.max_nesting})"
                            )
                    if problem is None:
                        parsed[i] = value
                        valid.append(i)
                    else:
                        bad.append((i, problem))
                if valid:
                    stack.append((valid, _VALID))
            elif state == _VALID:
                groups = group_by_types(part, parsed)
                if len(groups) > 1:
                    stack.extend((g, _GROUPED) for g in reversed(groups))
                else:
                    stack.extend(_halves(part, _GROUPED))
            elif len(part) <= _SMALL_RANGE:
                # Valid JSON objects of one shape that Arrow still rejects: one read each.
                stack.extend(([i], _GROUPED) for i in reversed(part))
            else:
                stack.extend(_halves(part, _GROUPED))
        return parts, bad

    def _try(
        self, lines: list[bytes], schema: pa.Schema | None
    ) -> tuple[pa.Table | None, str | None, pa.Schema | None, list[tuple[int, str]]]:
        """One read of ``lines``: ``(table, error, merged schema, rejected rows)``.

        Rows that read fine but whose values' types conflict with ``schema`` are returned as
        rejected ``(position, error)`` pairs, the table holding the others.
        """
        try:
            table = self._read(b"\n".join(lines), max(map(len, lines)))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            return None, str(exc), None, []
        if table.num_rows != len(lines):
            return None, "not exactly one JSON object", None, []
        depth = max((nesting_depth(f.type) for f in table.schema), default=0)
        if depth > self.max_nesting:
            error = f"payload is nested {depth} levels deep (at most {self.max_nesting})"
            return None, error, None, []
        if schema is None:
            return table, None, table.schema, []
        try:
            merged = pa.unify_schemas([schema, table.schema], promote_options="permissive")
            return table, None, merged, []
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            conflict = f"a field's type conflicts with the table or earlier messages: {exc}"
        # Arrow read these rows together, so the conflict is per field: the rows holding a
        # value in a conflicting field are the bad ones (found without reading row by row).
        aligned, mask, errors = split_conflicts(
            table, schema, against="the table or earlier messages of the batch"
        )
        if mask is None:
            return None, conflict, None, []
        kept = aligned.filter(pc.invert(mask))
        try:
            merged = pa.unify_schemas([schema, kept.schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None, conflict, None, []
        rejected = [(i, errors[i] or conflict) for i in pc.indices_nonzero(mask).to_pylist()]
        return kept, None, merged, rejected


def decode(
    batch: MessageBatch,
    format: PayloadFormat = "json",
    *,
    decoder: BatchDecoder | None = None,
    table_schema: pa.Schema | None = None,
) -> Decoded:
    """Decode one batch (see :meth:`BatchDecoder.decode`).

    Pass a decoder to reuse what it learnt about the payloads.
    """
    return (decoder or BatchDecoder(format)).decode(batch, table_schema)


def validate_payload(payload: bytes) -> str | None:
    """Why ``payload`` cannot be a row, or ``None`` when it is a JSON object."""
    return _parse(payload)[1]


def _parse(payload: bytes) -> tuple[object, str | None]:
    if not payload.strip():
        return None, "empty payload"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"payload is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        value = json.loads(text)
    except RecursionError:
        return None, "payload is nested too deeply to read"
    except ValueError as exc:
        return None, f"payload is not JSON: {exc}"
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )
        return None, f"payload is {kind}, not a JSON object"
    return value, None


def _halves(part: list[int], state: int) -> list[tuple[list[int], int]]:
    mid = len(part) // 2
    return [(part[mid:], state), (part[:mid], state)]  # popped left first


def _decode_raw(batch: MessageBatch) -> Decoded:
    columns = [pa.array(batch.payloads, pa.binary()), *metadata_arrays(batch)]
    return Decoded(
        pa.Table.from_arrays(columns, schema=RAW_SCHEMA), DEAD_LETTER_SCHEMA.empty_table()
    )


def _with_metadata(table: pa.Table, batch: MessageBatch, indices: list[int] | None) -> pa.Table:
    # Metadata is authoritative: a payload field with a metadata column's name is dropped.
    clash = [name for name in table.column_names if name in METADATA_COLUMNS]
    if clash:
        table = table.drop_columns(clash)
    arrays = metadata_arrays(batch, indices)
    if table.num_columns == 0:
        return pa.Table.from_arrays(arrays, schema=METADATA_SCHEMA)
    for field, array in zip(METADATA_FIELDS, arrays, strict=True):
        table = table.append_column(field, array)
    return table


def _many_brackets(payload: bytes) -> bool:
    return payload.count(b"{") + payload.count(b"[") > _ARROW_SAFE_BRACKETS


def _too_deep(schema: pa.Schema, limit: int) -> bool:
    return any(nesting_depth(f.type) > limit for f in schema)


__all__ = [
    "DATA_COLUMN",
    "MAX_NESTING",
    "BatchDecoder",
    "Decoded",
    "PayloadFormat",
    "decode",
    "validate_payload",
]
