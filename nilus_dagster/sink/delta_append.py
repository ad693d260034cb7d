"""Small appends to a local Delta table, written without deltalake's commit machinery.

A service run commits each caught-up pipeline about once a poll, a few rows at a time. Through
deltalake 1.6.6 such a commit costs 20-25 ms of CPU (snapshot update, log listing, conflict
check); written here it costs 1-2 ms: one Parquet file written by pyarrow and one log entry,
created only if its version is free, as Delta's protocol asks of every writer. Readers,
deltalake included, cannot tell these commits from deltalake's own.

Exactly once holds as through deltalake. The entry carries the pipeline's ``txn`` and is
created at the version after the one the position was read at (a hard link, which fails when
the version exists, as deltalake's local commits do). When that version is taken, the entries
written since are read:

- one holding the pipeline's ``txn`` (another run, a window replay, an overwrite) or changing
  the table's metadata or protocol is a conflict: :class:`AppendConflict`, and the position
  must be read again;
- anything else (another pipeline's commit, a compaction) does not touch what this append
  decided, and the entry goes to the next free version.

Used only where nothing more is needed (:func:`direct_appends_allowed`): a table on the local file
system, unpartitioned, whose protocol asks for no writer feature, and rows that cast to the
table's schema as they are (:func:`rows_for_table`). Everything else goes through deltalake.
"""

import json
import os
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable

from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.version import __version__

PENDING_PREFIX = "_commit_"
"""Log entries being written (deltalake's own prefix); one left by a killed run is garbage."""
STRING_STATS_MAX_CHARS = 32
"""Longest string kept whole in the statistics (deltalake truncates longer ones; these skip)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CLIENT = f"nilus-dagster-{__version__}"


class AppendConflict(Exception):
    """A commit since the position was read touched the pipeline's ``txn`` or the schema."""


class DirectAppends:
    """One writer's direct appends to one table: when they may be used, and how far they went.

    Args:
        location: The table (direct appends need it on the local file system).
        app_id: The pipeline's ``txn`` app id.

    Attributes:
        appended: The version of the last direct append, ahead of the writer's deltalake
            snapshot; ``None`` once the snapshot caught up (or before any).
    """

    def __init__(self, location: TableLocation, app_id: str):
        self.location = location
        self.app_id = app_id
        self.appended: int | None = None
        self._allowed: tuple[int, bool] | None = None  # (snapshot version, allowed)

    def allowed(self, table: DeltaTable) -> bool:
        """Whether ``table``'s protocol and metadata let appends bypass deltalake.

        Read again whenever the snapshot moves: a writer may have added a constraint or a
        table feature since. Versions an append skips over are read by it instead.
        """
        version = table.version()
        if self._allowed is None or self._allowed[0] != version:
            self._allowed = (version, direct_appends_allowed(table, local=self.location.is_local))
        return self._allowed[1]

    def append(
        self,
        table: DeltaTable,
        rows: pa.Table,
        schema: pa.Schema,
        version: int,
        *,
        last_seq: int,
        metadata: Mapping[str, str],
    ) -> bool:
        """Append ``rows`` after ``version`` directly; ``False`` when deltalake must write them.

        Raises:
            AppendConflict: A commit since ``version`` moved the position or the schema.
            OSError: The file system refused a write.
        """
        fitted = rows_for_table(rows, schema) if self.allowed(table) else None
        if fitted is None:
            return False
        self.appended = append_to_log(
            local_path(self.location.uri),
            version,
            fitted,
            app_id=self.app_id,
            txn_version=last_seq,
            metadata=metadata,
        )
        return True


def direct_appends_allowed(table: DeltaTable, *, local: bool) -> bool:
    """Whether appends to ``table`` may bypass deltalake.

    The protocol must be reader 1 and writer 2 at most, with no table features (writer 2 adds
    only ``appendOnly``, which an append honours, and invariants, refused here). Constraints,
    generated or identity columns, change data feed, column mapping and deletion vectors all
    need a higher writer version.

    Args:
        table: A snapshot of the table.
        local: The table is on the local file system (put-if-absent by hard link).
    """
    if not local:
        return False
    protocol = table.protocol()
    if protocol.min_reader_version > 1 or protocol.min_writer_version > 2:
        return False
    if protocol.writer_features or protocol.reader_features:
        return False
    metadata = table.metadata()
    if metadata.partition_columns:
        return False
    if any(key.startswith("delta.constraints.") for key in metadata.configuration):
        return False
    return "delta.invariants" not in table.schema().to_json()


def rows_for_table(rows: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """``rows`` cast to the table's ``schema``, or ``None`` when deltalake must write them.

    ``None`` when a column is missing or new (deltalake fills or adds it) or does not cast
    without loss (the sink's conforming makes that rare).
    """
    if rows.num_columns != len(schema) or set(rows.column_names) != set(schema.names):
        return None
    try:
        return rows.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
        return None  # ValueError: nulls for a NOT NULL column, which deltalake refuses clearly


def local_path(uri: str) -> Path:
    """The folder of a local table, from a plain path or a ``file:`` URI (percent-decoded)."""
    if "://" not in uri:
        return Path(uri)
    parsed = urlparse(uri)
    return Path(url2pathname(parsed.path))


def remove_abandoned_entries(root: str | os.PathLike[str], older_than_seconds: float) -> int:
    """Delete log entries a killed writer left half-made; return how many.

    Args:
        root: The table's folder.
        older_than_seconds: Only files older than this (a live writer's are milliseconds old).
    """
    cutoff = time.time() - older_than_seconds
    removed = 0
    for pending in (Path(root) / "_delta_log").glob(f"{PENDING_PREFIX}*.json.tmp"):
        try:
            if pending.stat().st_mtime < cutoff:
                pending.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # its writer (or another cleaner) got there first
    return removed


def append_to_log(
    root: str | os.PathLike[str],
    version: int,
    rows: pa.Table,
    *,
    app_id: str,
    txn_version: int,
    metadata: Mapping[str, str],
) -> int:
    """Commit ``rows`` and the pipeline's position as the first free version after ``version``.

    Args:
        root: The table's folder.
        version: The table version the position was read at (or this writer's last commit).
        rows: Rows in the table's schema (:func:`rows_for_table`); none commits the position.
        app_id: The pipeline's ``txn`` app id.
        txn_version: The position the commit moves to.
        metadata: ``commitInfo`` entries (the stream's creation time, the run's ids).

    Returns:
        The version committed.

    Raises:
        AppendConflict: A commit since ``version`` moved the position or changed the schema.
        OSError: The file system refused a write.
    """
    root = Path(root)
    log = root / "_delta_log"
    now_ms = int(time.time() * 1000)
    data_file = None
    actions: list[dict[str, object]] = [
        {
            "commitInfo": {
                **metadata,
                "timestamp": now_ms,
                "operation": "WRITE",
                "operationParameters": {"mode": "Append"},
                "clientVersion": _CLIENT,
                "operationMetrics": {
                    "num_added_files": 1 if rows.num_rows else 0,
                    "num_added_rows": rows.num_rows,
                },
            }
        },
        {"txn": {"appId": app_id, "version": txn_version, "lastUpdated": now_ms}},
    ]
    if rows.num_rows:
        name = f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
        data_file = root / name
        pq.write_table(rows, data_file, compression="snappy")
        add = {
            "path": name,
            "partitionValues": {},
            "size": data_file.stat().st_size,
            "modificationTime": now_ms,
            "dataChange": True,
            "stats": json.dumps(file_statistics(rows), separators=(",", ":")),
        }
        actions.append({"add": add})
    pending = log / f"{PENDING_PREFIX}{uuid.uuid4()}.json.tmp"
    text = "".join(json.dumps(a, separators=(",", ":"), allow_nan=False) + "\n" for a in actions)
    pending.write_text(text)
    try:
        return _link_after(log, version, pending, app_id)
    except AppendConflict:
        if data_file is not None:
            data_file.unlink(missing_ok=True)
        raise
    finally:
        pending.unlink(missing_ok=True)


def _link_after(log: Path, version: int, pending: Path, app_id: str) -> int:
    """Link ``pending`` as the first free version after ``version``; return that version.

    Log cleanup removes a prefix of the entries (those before a checkpoint, past the
    retention), so while the entry at ``version`` exists every later one that was written
    exists too, and a free name is a free version. Without it the name may be free because it
    was cleaned: readers start from a newer checkpoint and would never see the entry.
    """
    target = version + 1
    while True:
        base = log / f"{target - 1:020d}.json"
        if not base.exists():
            raise AppendConflict(f"table version {target - 1} left the log (cleaned)")
        entry = log / f"{target:020d}.json"
        try:
            os.link(pending, entry)
        except FileExistsError:
            reason = _conflict_in(entry, app_id)
            if reason:
                raise AppendConflict(f"table version {target} {reason}") from None
            target += 1
            continue
        if not base.exists():
            # Cleaned in between: whether the entry counts is for the next open() to read.
            raise AppendConflict(f"table version {target - 1} was cleaned during the commit")
        return target


def file_statistics(rows: pa.Table) -> dict[str, object]:
    """The ``add`` action's statistics for a file holding ``rows``.

    Row count, and null counts and bounds for the top-level columns of simple types, formatted
    as deltalake writes them (timestamps to the millisecond, in UTC). Columns left out, nested
    ones and long strings among them, only make readers read that file where they could have
    skipped it.
    """
    minimum: dict[str, object] = {}
    maximum: dict[str, object] = {}
    nulls: dict[str, int] = {}
    for field, column in zip(rows.schema, rows.columns, strict=True):
        kind = field.type
        if not _has_simple_statistics(kind):
            continue
        nulls[field.name] = column.null_count
        if column.null_count == len(column):
            continue
        if pa.types.is_floating(kind) and not pc.all(pc.is_finite(column)).as_py():
            continue  # NaN or infinity: no valid JSON bound, and deltalake ignores such stats
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if text and pc.max(pc.utf8_length(column)).as_py() > STRING_STATS_MAX_CHARS:
            continue
        if pa.types.is_timestamp(kind):
            bounds = pc.min_max(column.cast(pa.int64()))
            minimum[field.name] = _timestamp_text(bounds["min"].as_py())
            maximum[field.name] = _timestamp_text(bounds["max"].as_py())
            continue
        bounds = pc.min_max(column)
        minimum[field.name] = bounds["min"].as_py()
        maximum[field.name] = bounds["max"].as_py()
    return {
        "numRecords": rows.num_rows,
        "minValues": minimum,
        "maxValues": maximum,
        "nullCount": nulls,
    }


def _has_simple_statistics(kind: pa.DataType) -> bool:
    if pa.types.is_timestamp(kind):
        return kind.unit == "us" and kind.tz is not None  # Delta's ``timestamp``
    return (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )


def _timestamp_text(micros: int) -> str:
    moment = _EPOCH + timedelta(milliseconds=micros // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _conflict_in(entry: Path, app_id: str) -> str | None:
    """Why the commit at ``entry`` conflicts with an append by ``app_id``, or ``None``."""
    try:
        text = entry.read_text()
    except FileNotFoundError:
        return "left the log (cleaned)"
    for line in text.splitlines():
        if not line.strip():
            continue
        action = json.loads(line)
        txn = action.get("txn")
        if txn is not None and txn.get("appId") == app_id:
            return f"moved the position of {app_id!r} to {txn.get('version')}"
        if "metaData" in action or "protocol" in action:
            return "changed the table's schema or protocol"
    return None
