"""Fit a decoded batch to a Delta table's schema: grow, cast, or dead-letter.

A batch's types come from Arrow's inference over that batch alone, so they can differ from the
table's: a field missing from every message of the batch, a number that happens to be integral,
a struct with a new child. Those fit (nulls, casts, schema growth). A value whose type the
table's column cannot hold (a string in a number column) makes its row a dead letter, with an
error naming the column and both types; the rest of the batch is kept.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nilus_dagster.sink.schema import (
    DATA_COLUMN,
    DEAD_LETTER_SCHEMA,
    METADATA_COLUMNS,
    TIMESTAMP_TYPE,
    truncate_error,
)

_FIT, _CHECK = 0, 1  # a cast that always works / one that some values may fail
_SMALL = 16  # below this many rows, a failed checked cast is retried value by value


@dataclass(frozen=True)
class _Plan:
    target: pa.DataType
    mode: int


class _Conflict(Exception):
    pass


def conform(
    rows: pa.Table,
    table_schema: pa.Schema | None,
    *,
    payloads: Mapping[int, bytes] | None = None,
    required: Sequence[str] = (),
    failed_at: datetime | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Align ``rows`` with ``table_schema``.

    Args:
        rows: A decoded batch (payload columns and the metadata columns).
        table_schema: The table's current schema, or ``None`` for a table not created yet.
        payloads: Raw payloads by stream sequence, to put the exact bytes in dead letters.
            Without it a dead letter holds the row's values re-encoded as JSON.
        required: Fields every row must have, non-null (a merge table's primary key).
        failed_at: Time stamped on the dead letters (now by default).

    Returns:
        ``(rows, dead_letters)``: rows whose columns are the table's (missing ones as nulls, in
        the table's order) plus the batch's new ones, and the rows that conflict with the table.
    """
    rows = without_void_fields(rows, table_schema)
    out, bad_rows, errors = split_conflicts(rows, table_schema, required=required)
    if bad_rows is None:
        return out, DEAD_LETTER_SCHEMA.empty_table()
    dead = _dead_letters(rows, bad_rows, errors, payloads, failed_at)
    return out.filter(pc.invert(bad_rows)), dead


def without_void_fields(rows: pa.Table, table_schema: pa.Schema | None = None) -> pa.Table:
    """Objects rebuilt without the fields Delta cannot store: empty objects and null members.

    Two shapes of valid payload broke a table for good:

    - ``{"a": {}}`` and ``[{}]`` read as ``struct<>``, which Parquet cannot write: the commit
      failed, and so did every re-run.
    - ``{"s": {"b": null}}`` gave the table a ``void`` member ``s.b``; a later object in ``b``
      changed its type to a struct, the commit landed, and the log could no longer be read
      (the old file's statistics hold a number where the new schema wants an object).

    So a member that is null in every row and new to the table is left out (as a missing
    field, it is null when read, and takes the type of its first real values later), and an
    object left without members is a null. Where the table's column holds something else
    than objects (a number, a list), the value is left as is: a conflict, which makes the row
    a dead letter.
    """
    targets = {f.name: f.type for f in table_schema} if table_schema is not None else {}
    for index, field in enumerate(rows.schema):
        if _has_void(field.type):
            # Chunk by chunk: the result's type depends on the types alone, and a column
            # chunked unlike its neighbours made delta-rs panic (abort) on write.
            target = targets.get(field.name)
            chunks = rows.column(index).chunks or [pa.array([], field.type)]
            fixed = pa.chunked_array([_without_void(chunk, target) for chunk in chunks])
            rows = rows.set_column(index, pa.field(field.name, fixed.type), fixed)
    return rows


def _has_void(dtype: pa.DataType) -> bool:
    if pa.types.is_struct(dtype):
        return dtype.num_fields == 0 or any(
            pa.types.is_null(dtype.field(i).type) or _has_void(dtype.field(i).type)
            for i in range(dtype.num_fields)
        )
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _has_void(dtype.value_type)
    return False


def _without_void(array: pa.Array, target: pa.DataType | None) -> pa.Array:
    dtype = array.type
    if not _has_void(dtype):
        return array
    if target is not None and pa.types.is_null(target):
        target = None
    if pa.types.is_struct(dtype):
        if target is not None and not pa.types.is_struct(target):
            return array  # an object where the table has no objects: a conflict
        inner = {f.name: f.type for f in target} if target is not None else {}
        names, children = [], []
        for i, child in enumerate(array.flatten()):
            name = dtype.field(i).name
            child = _without_void(child, inner.get(name))
            # A null member the table already has a type for is cast to it later; only a
            # member the table does not have would bring a void type into its schema.
            if not pa.types.is_null(child.type) or inner.get(name) is not None:
                names.append(name)
                children.append(child)
        if not children:
            return pa.nulls(len(array))
        return pa.StructArray.from_arrays(children, names=names, mask=array.is_null())
    if target is not None and not (pa.types.is_list(target) or pa.types.is_large_list(target)):
        return array
    kind = pa.LargeListArray if pa.types.is_large_list(dtype) else pa.ListArray
    values = _without_void(
        array.values,  # type: ignore[attr-defined]
        target.value_type if target is not None else None,
    )
    return kind.from_arrays(array.offsets, values, mask=array.is_null())  # type: ignore[attr-defined]


def split_conflicts(
    rows: pa.Table,
    schema: pa.Schema | None,
    *,
    required: Sequence[str] = (),
    against: str = "the table",
) -> tuple[pa.Table, pa.Array | None, list[str | None]]:
    """The vectorised core of :func:`conform`, without building dead letters.

    Returns:
        ``(aligned, bad, errors)``: all rows aligned with ``schema`` (conflicting values as
        nulls), a mask of the rows that conflict (``None`` when none do) and each row's error.
    """
    table_schema = schema
    table_fields = {f.name: f for f in table_schema} if table_schema is not None else {}
    folded = {name.casefold(): name for name in table_fields}
    n = rows.num_rows
    columns: dict[str, pa.ChunkedArray] = {}
    problems: list[tuple[pa.ChunkedArray | pa.Array, str]] = []  # (bad-row mask, error)
    seen_folded: dict[str, str] = {}
    for field in rows.schema:
        name, column = field.name, rows.column(field.name)
        if name in METADATA_COLUMNS or _is_raw_data(field):
            # Written by us with fixed types; Delta maps uint64 to long on write. (A JSON
            # payload's own "_nats_data" field is a payload column like any other: let
            # through unchecked, a later type change failed every commit.)
            columns[name] = column
            continue
        other = seen_folded.get(name.casefold()) or (
            folded.get(name.casefold()) if name not in table_fields else None
        )
        if other is not None and other != name:
            # Delta column names are case-insensitive: the table cannot hold both.
            problems.append(
                (
                    pc.is_valid(column),
                    f"field {name!r} differs only in letter case from column {other!r}; "
                    "Delta column names are case-insensitive",
                )
            )
            continue
        seen_folded[name.casefold()] = name
        duplicate = _case_duplicate(field.type)
        if duplicate is not None:
            problems.append(
                (
                    pc.is_valid(column),
                    f"field {name!r} has nested fields {duplicate} that differ only in letter "
                    "case; Delta column names are case-insensitive",
                )
            )
            continue
        existing = table_fields.get(name)
        if existing is None:
            if pa.types.is_null(field.type):
                continue  # all nulls: nothing to keep, and Delta has no portable null type
            columns[name] = column
            continue
        try:
            plan = _plan(field.type, existing.type)
        except _Conflict:
            plan = None
        if plan is None:
            problems.append(
                (pc.is_valid(column), _type_error(name, field.type, existing.type, against))
            )
            columns[name] = pa.chunked_array([pa.nulls(n, existing.type)])
            continue
        if plan.mode == _FIT:
            columns[name] = column if column.type == plan.target else column.cast(plan.target)
            continue
        cast, bad = _checked_cast(column, plan.target)
        columns[name] = cast
        if bad is not None:
            problems.append((bad, _type_error(name, field.type, existing.type, against, True)))
    for key in required:
        missing = (
            pc.is_null(rows.column(key))
            if key in rows.column_names
            else pa.array([True] * n, pa.bool_())
        )
        problems.append((missing, f"primary key field {key!r} is missing or null"))
    ordered: dict[str, pa.ChunkedArray] = {}
    for name, existing in table_fields.items():
        if name in columns:
            ordered[name] = columns.pop(name)
        else:
            ordered[name] = pa.chunked_array([pa.nulls(n, existing.type)])
    ordered.update(columns)
    out = pa.table(ordered) if ordered else rows.select([])
    if not problems:
        return out, None, []
    bad_rows, errors = _row_errors(problems, n)
    return out, bad_rows, errors


def _type_error(
    name: str, found: pa.DataType, table: pa.DataType, against: str, values: bool = False
) -> str:
    what = "value does not fit" if values else "is"
    return (
        f"field {name!r} {what} {_type_name(found)} in this message but column {name!r} "
        f"is {_type_name(table)} in {against}"
    )


def _type_name(dtype: pa.DataType) -> str:
    return str(dtype).replace("item: ", "").replace("element: ", "")


def _plan(src: pa.DataType, dst: pa.DataType) -> _Plan:
    """How ``src`` values fit a ``dst`` column: the type to cast to and whether it can fail.

    Raises:
        _Conflict: ``src`` values can never be ``dst`` values.
    """
    if src.equals(dst):
        return _Plan(dst, _FIT)
    if pa.types.is_null(src):
        return _Plan(dst, _FIT)
    if pa.types.is_null(dst):
        return _Plan(src, _FIT)  # e.g. a list that was always empty so far: Delta widens it
    if _is_int(src) and _is_int(dst):
        wider = dst.bit_width >= src.bit_width and (
            pa.types.is_signed_integer(dst) == pa.types.is_signed_integer(src)
            or (pa.types.is_signed_integer(dst) and dst.bit_width > src.bit_width)
        )
        return _Plan(dst, _FIT if wider else _CHECK)
    if (_is_int(src) or pa.types.is_floating(src)) and pa.types.is_floating(dst):
        return _Plan(dst, _FIT)
    if _is_number(src) and _is_number(dst):
        return _Plan(dst, _CHECK)  # a fraction, or a value out of range, does not fit
    if _is_text(src) and _is_text(dst):
        return _Plan(dst, _FIT)
    if _is_bytes(src) and _is_bytes(dst):
        return _Plan(dst, _FIT)
    if _is_text(src) and (pa.types.is_timestamp(dst) or pa.types.is_date(dst)):
        return _Plan(dst, _CHECK)  # ISO text into a table's date/time column
    if pa.types.is_struct(src) and pa.types.is_struct(dst):
        return _plan_struct(src, dst)
    if _is_list(src) and _is_list(dst):
        inner = _plan(src.value_type, dst.value_type)
        field = dst.value_field.with_type(inner.target)
        target = pa.large_list(field) if pa.types.is_large_list(dst) else pa.list_(field)
        return _Plan(target, inner.mode)
    if pa.types.is_map(src) and pa.types.is_map(dst):
        key = _plan(src.key_type, dst.key_type)
        item = _plan(src.item_type, dst.item_type)
        return _Plan(pa.map_(key.target, item.target), max(key.mode, item.mode))
    raise _Conflict


def _plan_struct(src: pa.StructType, dst: pa.StructType) -> _Plan:
    dst_fields = {dst.field(i).name: dst.field(i) for i in range(dst.num_fields)}
    folded = {name.casefold(): name for name in dst_fields}
    planned = {name: field for name, field in dst_fields.items()}
    mode = _FIT
    for i in range(src.num_fields):
        child = src.field(i)
        existing = dst_fields.get(child.name)
        if existing is None:
            if child.name.casefold() in folded:
                raise _Conflict
            if not pa.types.is_null(child.type):
                planned[child.name] = child  # a new nested field: the schema grows
            continue
        inner = _plan(child.type, existing.type)
        planned[child.name] = existing.with_type(inner.target)
        mode = max(mode, inner.mode)
    return _Plan(pa.struct(list(planned.values())), mode)


def _checked_cast(
    column: pa.ChunkedArray, target: pa.DataType
) -> tuple[pa.ChunkedArray, pa.Array | None]:
    """Cast ``column``; values that do not fit become nulls and are flagged in the mask."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    try:
        return pa.chunked_array([array.cast(target)]), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    bad: list[int] = []
    _find_uncastable(array, target, 0, bad)
    mask = [False] * len(array)
    for i in bad:
        mask[i] = True
    bad_mask = pa.array(mask, pa.bool_())
    cleaned = pc.if_else(bad_mask, pa.nulls(len(array), array.type), array)
    return pa.chunked_array([cleaned.cast(target)]), bad_mask


def _find_uncastable(array: pa.Array, target: pa.DataType, offset: int, bad: list[int]) -> None:
    if len(array) <= _SMALL:
        for i in range(len(array)):
            try:
                array.slice(i, 1).cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                bad.append(offset + i)
        return
    try:
        array.cast(target)
        return
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    mid = len(array) // 2
    _find_uncastable(array.slice(0, mid), target, offset, bad)
    _find_uncastable(array.slice(mid), target, offset + mid, bad)


def _row_errors(
    problems: Sequence[tuple[pa.ChunkedArray | pa.Array, str]], n: int
) -> tuple[pa.Array, list[str | None]]:
    bad = pa.array([False] * n, pa.bool_())
    errors: list[str | None] = [None] * n
    for mask, text in problems:
        mask = pc.fill_null(mask, False)
        if isinstance(mask, pa.ChunkedArray):
            mask = mask.combine_chunks()
        bad = pc.or_(bad, mask)
        for i in pc.indices_nonzero(mask).to_pylist():
            errors[i] = text if errors[i] is None else f"{errors[i]}; {text}"
    return bad, errors


def _dead_letters(
    rows: pa.Table,
    bad: pa.Array,
    errors: list[str | None],
    payloads: Mapping[int, bytes] | None,
    failed_at: datetime | None,
) -> pa.Table:
    picked = rows.filter(bad)
    texts = [truncate_error(e or "") for e in errors if e is not None]
    if payloads is not None:
        data = [payloads.get(seq) for seq in picked.column("_nats_seq").to_pylist()]
    else:
        data = [None] * picked.num_rows
    if any(d is None for d in data):
        rebuilt = _as_json(picked)
        data = [d if d is not None else r for d, r in zip(data, rebuilt, strict=True)]
    when = failed_at or datetime.now(timezone.utc)
    columns = [
        picked.column(name).cast(DEAD_LETTER_SCHEMA.field(name).type)
        if name in picked.column_names
        else pa.nulls(picked.num_rows, DEAD_LETTER_SCHEMA.field(name).type)
        for name in METADATA_COLUMNS
    ]
    columns += [
        pa.array(data, pa.binary()),
        pa.array(texts, pa.string()),
        pa.repeat(pa.scalar(when, TIMESTAMP_TYPE), picked.num_rows),
    ]
    return pa.Table.from_arrays(columns, schema=DEAD_LETTER_SCHEMA)


def _is_raw_data(field: pa.Field) -> bool:
    """Whether ``field`` is the raw format's payload column (binary), not a JSON field."""
    return field.name == DATA_COLUMN and pa.types.is_binary(field.type)


def _as_json(rows: pa.Table) -> list[bytes]:
    if DATA_COLUMN in rows.column_names and _is_raw_data(rows.schema.field(DATA_COLUMN)):
        return [bytes(d or b"") for d in rows.column(DATA_COLUMN).to_pylist()]
    payload = rows.drop_columns([c for c in rows.column_names if c in METADATA_COLUMNS])
    return [
        json.dumps(record, default=_json_default, separators=(",", ":")).encode()
        for record in payload.to_pylist()
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Iterable) and not isinstance(value, str | dict):
        return list(value)
    return str(value)


def _case_duplicate(dtype: pa.DataType) -> list[str] | None:
    if pa.types.is_struct(dtype):
        seen: dict[str, str] = {}
        for i in range(dtype.num_fields):
            child = dtype.field(i)
            key = child.name.casefold()
            if key in seen and seen[key] != child.name:
                return [seen[key], child.name]
            seen[key] = child.name
            inner = _case_duplicate(child.type)
            if inner is not None:
                return inner
        return None
    if _is_list(dtype):
        return _case_duplicate(dtype.value_type)
    if pa.types.is_map(dtype):
        return _case_duplicate(dtype.item_type)
    return None


def _is_int(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype)


def _is_number(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype)


def _is_text(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or (pa.types.is_string_view(dtype))
    )


def _is_bytes(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
        or pa.types.is_binary_view(dtype)
        or pa.types.is_fixed_size_binary(dtype)
    )


def _is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
