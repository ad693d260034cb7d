"""``partition_by`` of a Delta table: plain columns, checked when the table is created."""

from collections.abc import Sequence

import pyarrow as pa

from nilus_dagster.errors import SinkError
from nilus_dagster.redaction import redact


def check_partition_columns(partition_by: Sequence[str], rows: pa.Table, uri: str) -> None:
    """Check the ``partition_by`` columns against the rows that create the table at ``uri``.

    Each must be there, of a type that one partition value can hold.

    Raises:
        SinkError: A column is missing or nested/binary; the message names it and the fields
            the rows do have.
    """
    transforms = [c for c in partition_by if "(" in c and c not in rows.column_names]
    if transforms:
        raise SinkError(
            f"partition_by names {transforms}: a Delta table is partitioned by plain columns, "
            "not transforms (those are Iceberg's): partition by a field the messages carry, "
            "such as a date, under spec.sink.options"
        )
    missing = [c for c in partition_by if c not in rows.column_names]
    if missing:
        have = [c for c in rows.column_names if not c.startswith("_nats_")]
        raise SinkError(
            f"partition_by names {missing}, which the rows creating the table {redact(uri)} do "
            f"not have (their fields: {have or 'none'}; a batch of only dead letters has "
            "none): fix partition_by under spec.sink.options to name fields every message "
            "carries"
        )
    unfit = [
        f"{name} ({rows.schema.field(name).type})"
        for name in partition_by
        if pa.types.is_nested(rows.schema.field(name).type)
        or pa.types.is_binary(rows.schema.field(name).type)
    ]
    if unfit:
        raise SinkError(
            f"partition_by names {unfit}: a partition column holds one plain value (text, "
            "number, boolean, date or time), not nested or binary data: partition by another "
            "field under spec.sink.options"
        )


def check_partitioning(partition_by: Sequence[str], existing: Sequence[str], uri: str) -> None:
    """An existing table must be partitioned as ``partition_by`` says (when it says anything).

    Raises:
        SinkError: The table at ``uri`` is partitioned otherwise; its partitioning cannot
            change after creation.
    """
    if not partition_by or tuple(existing) == tuple(partition_by):
        return
    raise SinkError(
        f"partition_by is {list(partition_by)}, but the table {redact(uri)} exists partitioned "
        f"by {list(existing)}, and a table's partitioning is set when it is created: write "
        f"partition_by: {list(existing) or '(remove it)'} under spec.sink.options, or write to "
        "a new dest_table"
    )
