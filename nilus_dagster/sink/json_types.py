"""Arrow types around Arrow's JSON reader: hints it learns, table types it reads into, fixes.

Shared by every sink writer through :mod:`nilus_dagster.sink.decode`: what the reader infers
from JSON text, how a table's column types translate back into reader hints, and the repair of
list-of-null columns the reader returns malformed.
"""

from collections.abc import Mapping

import pyarrow as pa

from nilus_dagster.sink.schema import DATA_COLUMN, METADATA_COLUMNS

_MAX_GROUPS = 16  # beyond this many payload shapes in a failed part, one line per read


class _Clash(Exception):
    pass


def with_valid_null_lists(table: pa.Table) -> pa.Table:
    """Pad the lists of nulls Arrow's JSON reader returns too short.

    pyarrow 26 reads ``[null, null]`` as a ``list<null>`` whose child holds fewer nulls than
    the lists span ("Length spanned by list offsets (2) larger than values array (length
    1)"), even with an explicit schema. Every element is null, so padding is exact.
    """
    for index, field in enumerate(table.schema):
        if _has_null_list(field.type):
            column = table.column(index)
            chunks = [_valid_null_lists(chunk) for chunk in column.chunks]
            table = table.set_column(index, field, pa.chunked_array(chunks, type=field.type))
    return table


def _has_null_list(dtype: pa.DataType) -> bool:
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return pa.types.is_null(dtype.value_type) or _has_null_list(dtype.value_type)
    if pa.types.is_struct(dtype):
        return any(_has_null_list(dtype.field(i).type) for i in range(dtype.num_fields))
    return False


def _valid_null_lists(array: pa.Array) -> pa.Array:
    dtype = array.type
    if not _has_null_list(dtype):
        return array
    if pa.types.is_struct(dtype):
        children = [_valid_null_lists(child) for child in array.flatten()]
        return pa.StructArray.from_arrays(children, fields=list(dtype), mask=array.is_null())
    offsets = array.offsets  # type: ignore[attr-defined]
    if pa.types.is_null(dtype.value_type):
        values = pa.nulls(offsets[-1].as_py() if len(offsets) else 0)
    else:
        values = _valid_null_lists(array.values)  # type: ignore[attr-defined]
    kind = pa.LargeListArray if pa.types.is_large_list(dtype) else pa.ListArray
    return kind.from_arrays(offsets, values, type=dtype, mask=array.is_null())


def as_json_types(schema: pa.Schema | None) -> pa.Schema | None:
    """The table's payload columns as the types Arrow infers from JSON holding their values."""
    if schema is None:
        return None
    fields = []
    for field in schema:
        if field.name in METADATA_COLUMNS or (
            field.name == DATA_COLUMN and pa.types.is_binary(field.type)
        ):
            continue
        dtype = _as_json_type(field.type)
        if dtype is not None:
            fields.append(pa.field(field.name, dtype))
    return pa.schema(fields) if fields else None


def _as_json_type(dtype: pa.DataType) -> pa.DataType | None:
    if pa.types.is_boolean(dtype):
        return dtype
    if pa.types.is_integer(dtype):
        return pa.int64()
    if pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return pa.float64()
    if (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_temporal(dtype)
        or pa.types.is_binary(dtype)
    ):
        return pa.string()  # dates and times arrive as ISO text
    if pa.types.is_struct(dtype):
        children = [
            pa.field(dtype.field(i).name, t)
            for i in range(dtype.num_fields)
            if (t := _as_json_type(dtype.field(i).type)) is not None
        ]
        return pa.struct(children)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        inner = _as_json_type(dtype.value_type)
        return pa.list_(inner) if inner is not None else None
    return None  # no JSON value is inferred as this type: let conform() judge it


def string_overrides(schema: pa.Schema) -> pa.Schema | None:
    """The fields of ``schema`` that hold an inferred timestamp, typed as strings instead.

    Structs keep only their children that need an override, so that the rest of the
    struct is still inferred.
    """
    fields = []
    for field in schema:
        override = _override_type(field.type)
        if override is not None:
            fields.append(pa.field(field.name, override))
    return pa.schema(fields) if fields else None


def _override_type(dtype: pa.DataType) -> pa.DataType | None:
    if pa.types.is_timestamp(dtype):
        return pa.string()
    if pa.types.is_struct(dtype):
        children = []
        for i in range(dtype.num_fields):
            child = dtype.field(i)
            override = _override_type(child.type)
            if override is not None:
                children.append(pa.field(child.name, override))
        return pa.struct(children) if children else None
    if pa.types.is_list(dtype):
        inner = _override_type(dtype.value_type)
        return pa.list_(inner) if inner is not None else None
    return None


def merge_hints(old: pa.Schema | None, new: pa.Schema) -> pa.Schema:
    """``old`` hints with ``new`` ones added (struct and list children merged, others replaced)."""
    if old is None:
        return new
    fields = {f.name: f for f in old}
    for field in new:
        previous = fields.get(field.name)
        merged = field.type if previous is None else _merge_hint_types(previous.type, field.type)
        fields[field.name] = pa.field(field.name, merged)
    return pa.schema(list(fields.values()))


def _merge_hint_types(old: pa.DataType, new: pa.DataType) -> pa.DataType:
    if pa.types.is_struct(old) and pa.types.is_struct(new):
        merged = merge_hints(pa.schema(list(old)), pa.schema(list(new)))
        return pa.struct(list(merged))
    if pa.types.is_list(old) and pa.types.is_list(new):
        return pa.list_(_merge_hint_types(old.value_type, new.value_type))
    return new  # the payloads changed shape; the newest shape is the better guess


def group_by_types(part: list[int], parsed: Mapping[int, object]) -> list[list[int]]:
    """Split ``part`` into groups whose fields' JSON types agree (first fit, in order).

    Missing and null fields agree with anything; numbers agree with numbers (Arrow promotes
    integers to doubles). Groups are returned in the order of their first line.
    """
    shapes: list[object] = []  # per open group: the merged shape of its lines
    groups: list[list[int]] = []
    open_groups: list[int] = []  # groups that take more lines, by index into groups
    for i in part:
        try:
            shape = _shape(parsed[i])
        except _Clash:  # a list mixing types: Arrow rejects this line on its own
            groups.append([i])
            continue
        for slot, g in enumerate(open_groups):
            try:
                shapes[slot] = _merge_shapes(shapes[slot], shape)
            except _Clash:
                continue
            groups[g].append(i)
            break
        else:
            groups.append([i])
            if len(open_groups) < _MAX_GROUPS:  # beyond that many shapes, one line per read
                open_groups.append(len(groups) - 1)
                shapes.append(shape)
    return groups


def value_depth(value: object) -> int:
    """Container levels below a parsed object's top level, found without recursion.

    Counted as Arrow counts struct and list nesting.
    """
    deepest = 0
    stack: list[tuple[object, int]] = []
    if isinstance(value, dict):
        stack.extend((v, 0) for v in value.values())
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth + 1)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _shape(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        element: object = None
        for item in value:
            element = _merge_shapes(element, _shape(item))
        return ("list", element)
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return "other"


def _merge_shapes(a: object, b: object) -> object:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        merged = dict(a)
        for key, value in b.items():
            merged[key] = _merge_shapes(merged.get(key), value)
        return merged
    if isinstance(a, tuple) and isinstance(b, tuple):
        return ("list", _merge_shapes(a[1], b[1]))
    if a == b:
        return a
    raise _Clash
