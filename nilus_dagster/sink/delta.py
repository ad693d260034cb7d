"""The Delta Lake sink: rows, dead letters and the stream position in one transaction.

The position is a Delta transaction identifier (``txn``: app id = the pipeline, version = the
last stream sequence written) committed atomically with the rows. It is read from the snapshot
that the next commit is written through, never from a fresh one: a second writer that commits
in between makes that commit fail (``CommitFailedError``), which surfaces here as
:class:`PositionConflict`. Writing by URI instead would load a fresh snapshot and let the
duplicate through (measured on deltalake 1.6.6).
"""

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import DEAD_LETTER_SUFFIX, TableLocation
from nilus_dagster.manifest.model import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_COMPACT_EVERY,
    IncrementalStrategy,
)
from nilus_dagster.messages import MessageBatch
from nilus_dagster.redaction import redact
from nilus_dagster.sink.conform import conform
from nilus_dagster.sink.decode import BatchDecoder, Decoded, PayloadFormat, decode
from nilus_dagster.sink.schema import METADATA_COLUMNS, METADATA_SCHEMA, TIMESTAMP_TYPE
from nilus_dagster.times import as_utc

logger = logging.getLogger("nilus_dagster.sink")

STREAM_CREATED_KEY = "nilus.stream_created"
"""Commit metadata key holding the creation time of the stream the position belongs to."""


_HISTORY_SCAN = 20  # recent commits searched first for the stream's creation time
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What deltalake raises for a failed write (object stores surface as OSError); anything else
# is a bug and propagates as is.
_WRITE_ERRORS = (DeltaError, OSError, pa.ArrowException)


class PositionConflict(SinkError):
    """Another writer committed to the table since it was opened: re-open, re-read the position."""


@dataclass(frozen=True)
class SinkState:
    """What :meth:`DeltaSink.open` found.

    Attributes:
        exists: Whether the table exists yet.
        position: Last stream sequence committed by this app id, 0 when none.
        stream_created: The ``nilus.stream_created`` commit metadata of the newest commit that
            has it (the stream the position belongs to), or ``None``.
        schema: The table's schema, ``None`` when it does not exist.
    """

    exists: bool
    position: int
    stream_created: str | None
    schema: pa.Schema | None


@dataclass(frozen=True)
class CommitResult:
    """What one commit wrote.

    Attributes:
        rows_written: Rows written to the table (source rows, for merge).
        dead_letters: Rows written to the dead-letter table.
        table_version: The table's version after the commit.
        position: The committed position.
    """

    rows_written: int
    dead_letters: int
    table_version: int | None
    position: int


class DeltaSink:
    """Writes decoded batches to one Delta table (and its dead-letter table), exactly once.

    Args:
        location: The table's URI and storage options (object-store options pass through).
        app_id: Transaction app id: the pipeline. Its version is the committed stream sequence.
        strategy: ``append`` inserts; ``merge`` upserts on ``primary_key``, a row being replaced
            only by a message with a higher stream sequence; ``replace`` overwrites the table on
            the first commit of a run (``overwrite=True``) and appends after that.
        primary_key: Merge key columns (required for ``merge``).
        create_table: Create the table with the first commit; ``False`` makes a missing table
            an error.
        compact_every: Run ``optimize.compact()`` every this many commits (0 disables).
        checkpoint_every: Write a checkpoint every this many commits (0 disables).
    """

    def __init__(
        self,
        location: TableLocation,
        *,
        app_id: str,
        strategy: IncrementalStrategy = "append",
        primary_key: Sequence[str] | None = None,
        create_table: bool = True,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ):
        if strategy not in ("append", "merge", "replace"):
            raise SinkError(f"incremental_strategy must be append, merge or replace: {strategy!r}")
        if strategy == "merge" and not primary_key:
            raise SinkError("incremental_strategy merge needs a primary_key to merge on")
        self.location = location
        self.dead_letter_location = location.sibling(DEAD_LETTER_SUFFIX)
        self.app_id = app_id
        self.strategy: IncrementalStrategy = strategy
        self.primary_key = tuple(primary_key or ())
        self.create_table = create_table
        self.compact_every = compact_every
        self.checkpoint_every = checkpoint_every
        self._options = {str(k): str(v) for k, v in location.storage_options.items()} or None
        self._table: DeltaTable | None = None
        self._dead: DeltaTable | None = None
        self._version: int | None = None  # txn version as read; None when never committed
        self._dead_version: int | None = None
        self._stream_created: str | None = None
        self._opened = False
        self._stale = False
        self._commits = 0
        self._schema: tuple[int, pa.Schema] | None = None
        self._decoders: dict[str, BatchDecoder] = {}
        self._required = self.primary_key if strategy == "merge" else ()

    # -- reading -------------------------------------------------------------------------------

    def open(self) -> SinkState:
        """Load the table and read the committed position (call again after a conflict).

        Raises:
            SinkError: The table is missing and ``create_table`` is false, or it cannot be read.
        """
        self._table = self._load(self.location.uri)
        if self._table is None and not self.create_table:
            raise SinkError(
                f"Delta table {redact(self.location.uri)} does not exist and create_table is "
                "false: create the table first, or set create_table: true under "
                "spec.sink.options to let the first run create it"
            )
        self._version = self._table.transaction_version(self.app_id) if self._table else None
        self._dead = self._load(self.dead_letter_location.uri)
        self._dead_version = self._dead.transaction_version(self.app_id) if self._dead else None
        self._stream_created = self._find_stream_created()
        self._opened = True
        self._stale = False
        return SinkState(
            exists=self._table is not None,
            position=self.position,
            stream_created=self._stream_created,
            schema=self.schema(),
        )

    @property
    def position(self) -> int:
        """Last stream sequence committed by this app id (0 when none), as of the snapshot."""
        return self._version or 0

    @property
    def table_version(self) -> int | None:
        return self._table.version() if self._table is not None else None

    def schema(self) -> pa.Schema | None:
        """The table's schema as Arrow, or ``None`` when the table does not exist."""
        if self._table is None:
            return None
        version = self._table.version()
        if self._schema is None or self._schema[0] != version:
            self._schema = (version, pa.schema(self._table.schema().to_arrow()))
        return self._schema[1]

    def row_count(self) -> int:
        """Rows in the table, from the file statistics of the snapshot (no data read)."""
        if self._table is None:
            return 0
        return self._table.count()

    def newest_timestamp(self) -> datetime | None:
        """The newest ``_nats_timestamp`` in the table (from file statistics when present)."""
        if self._table is None:
            return None
        actions = pa.table(self._table.get_add_actions(flatten=True))
        if actions.num_rows == 0:
            return None
        column = "max._nats_timestamp"
        if column in actions.column_names and actions.column(column).null_count == 0:
            newest = pc.max(actions.column(column)).as_py()
        else:
            # No statistics for some file: read just that column.
            data = self._table.to_pyarrow_dataset().to_table(columns=["_nats_timestamp"])
            newest = pc.max(data.column(0)).as_py()
        if newest is None:
            return None
        if isinstance(newest, datetime) and newest.tzinfo is None:
            newest = newest.replace(tzinfo=timezone.utc)
        return newest.astimezone(timezone.utc)

    def prepare(
        self,
        batch: MessageBatch,
        *,
        format: PayloadFormat = "json",
        decoder: BatchDecoder | None = None,
    ) -> Decoded:
        """Decode ``batch`` for this table: :func:`decode` then :meth:`conform`, in one call.

        Better than the two calls apart: when the batch's messages disagree on a field's
        type, the table's type decides which are dead letters, and dead letters found by
        conforming keep their exact payload bytes.

        Args:
            batch: The messages to write.
            format: The pipeline's payload format.
            decoder: The decoder to use; by default the sink keeps one per format, which
                learns the payloads' fields across batches.

        Returns:
            Conformed rows and all dead letters (decoding's, then conforming's).
        """
        schema = self.schema()
        if decoder is None:
            decoder = self._decoders.setdefault(format, BatchDecoder(format))
        decoded = decode(batch, format, decoder=decoder, table_schema=schema)
        rows, conflicts = conform(
            decoded.rows, schema, payloads=_Payloads(batch), required=self._required
        )
        dead = decoded.dead_letters
        if conflicts.num_rows:
            dead = pa.concat_tables([dead, conflicts]) if dead.num_rows else conflicts
        return Decoded(rows, dead)

    def conform(
        self, rows: pa.Table, *, payloads: Mapping[int, bytes] | None = None
    ) -> tuple[pa.Table, pa.Table]:
        """Align a decoded batch with the table's current schema.

        Missing columns become nulls, new columns are kept (the table's schema grows on
        commit), castable types are cast, and rows whose values conflict with the table's
        types are returned as dead letters naming the column and both types. For ``merge``,
        rows without a primary key value are dead letters too: they could never be merged.

        Args:
            rows: Decoded rows.
            payloads: Raw payloads by stream sequence, so that dead letters keep the exact
                bytes; without it they hold the row re-encoded as JSON.

        Returns:
            ``(rows, dead_letters)``.
        """
        return conform(rows, self.schema(), payloads=payloads, required=self._required)

    # -- writing -------------------------------------------------------------------------------

    def commit(
        self,
        rows: pa.Table | None,
        dead_letters: pa.Table | None,
        *,
        last_seq: int,
        overwrite: bool = False,
        commit_metadata: Mapping[str, str] | None = None,
    ) -> CommitResult:
        """Write ``rows`` and move the position to ``last_seq`` in one transaction.

        Dead letters go first, to their own table with their own ``txn`` (those at or below
        that table's version were written already and are skipped). Then the rows, with the
        position, through the snapshot the position was read from. Zero rows still commit the
        position.

        Args:
            rows: Conformed rows, each with ``_nats_seq <= last_seq``.
            dead_letters: Dead letters of the same messages.
            last_seq: The stream sequence of the last message these rows cover.
            overwrite: ``replace`` strategy: replace the whole table (first commit of a run).
            commit_metadata: Extra ``commitInfo`` entries (strings).

        Raises:
            PositionConflict: Another writer committed since :meth:`open`; re-open.
            SinkError: ``last_seq`` is not past the position, or the write failed.
        """
        self._require_open()
        if last_seq <= self.position:
            raise SinkError(
                f"refusing to commit up to sequence {last_seq}: {redact(self.location.uri)} "
                f"already holds everything up to {self.position} (drop what is at or below the "
                "position before committing)"
            )
        metadata = self._metadata(commit_metadata)
        if rows is None or rows.num_columns == 0:
            rows = METADATA_SCHEMA.empty_table()
        rows = _after(rows, self.position)
        dead_count = self._write_dead_letters(dead_letters, last_seq, metadata)
        properties = self._properties(last_seq, metadata)
        try:
            if self._table is None:
                self._table = self._create(self.location.uri, rows, self._version)
            if self.strategy == "merge":
                self._merge(rows, properties, "t.`_nats_seq` < s.`_nats_seq`")
            elif self.strategy == "replace" and overwrite:
                self._write(self._table, rows, "overwrite", properties)
            else:
                self._write(self._table, rows, "append", properties)
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "commit to") from None
        self._version = last_seq
        self._stream_created = metadata.get(STREAM_CREATED_KEY, self._stream_created)
        self._commits += 1
        self._maintain(metadata)
        return CommitResult(rows.num_rows, dead_count, self.table_version, self.position)

    def replace_window(
        self,
        rows: pa.Table | None,
        dead_letters: pa.Table | None,
        *,
        start: datetime,
        end: datetime,
        up_to: int | None = None,
        commit_metadata: Mapping[str, str] | None = None,
    ) -> CommitResult:
        """Replace the rows whose ``_nats_timestamp`` is in ``[start, end)`` with ``rows``.

        Only rows with ``_nats_seq <= up_to`` (default: the position) are replaced: the replay
        read the stream up to there, and rows after it belong to the writer that keeps
        appending (a service run), which may commit in between; retried after a
        :class:`PositionConflict`, the same rows replace the same rows.

        Append and replace tables overwrite exactly that window (rows outside it are left
        alone; given rows outside it, or past the position, are ignored). Merge tables merge
        ``rows`` in, a row being replaced by a message with an equal or higher sequence, so a
        re-run changes nothing. The position does not move: the same ``txn`` version is
        committed again. Dead letters (when given) replace the dead-letter table's rows of the
        window the same way.

        Raises:
            PositionConflict: Another writer committed since :meth:`open`; re-open.
            SinkError: The write failed.
        """
        self._require_open()
        start, end = as_utc(start), as_utc(end)
        if end <= start:
            raise SinkError(f"empty window {start.isoformat()}..{end.isoformat()}")
        metadata = self._metadata(commit_metadata)
        up_to = self.position if up_to is None else min(up_to, self.position)
        predicate = (
            f"`_nats_timestamp` >= '{_iso(start)}' AND `_nats_timestamp` < '{_iso(end)}' "
            f"AND `_nats_seq` <= {int(up_to)}"
        )
        # Messages past the position are the next normal run's to write; writing them here
        # would write them twice.
        rows = _up_to(_in_window(rows, start, end), up_to)
        dead = _up_to(_in_window(dead_letters, start, end), up_to)
        dead_count = 0
        if dead is not None and (self._dead is not None or dead.num_rows):
            props = self._properties(self._dead_version, metadata)
            try:
                if self._dead is None:
                    uri = self.dead_letter_location.uri
                    self._dead = self._create(uri, dead, self._dead_version)
                write_deltalake(
                    self._dead,
                    dead,
                    mode="overwrite",
                    predicate=predicate,
                    schema_mode="merge",
                    commit_properties=props,
                )
            except _WRITE_ERRORS as exc:
                raise self._error(exc, "replace the window of", dead=True) from None
            dead_count = dead.num_rows
        properties = self._properties(self._version, metadata)
        if self._table is None and (rows is None or rows.num_rows == 0):
            return CommitResult(0, dead_count, None, self.position)
        try:
            if self._table is None:
                assert rows is not None
                self._table = self._create(self.location.uri, rows, self._version)
            source = rows if rows is not None else self._empty_rows()
            if self.strategy == "merge":
                self._merge(source, properties, "t.`_nats_seq` <= s.`_nats_seq`", move=False)
            else:
                self._write(self._table, source, "overwrite", properties, predicate=predicate)
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "replace the window of") from None
        written = source.num_rows
        self._stream_created = metadata.get(STREAM_CREATED_KEY, self._stream_created)
        return CommitResult(written, dead_count, self.table_version, self.position)

    # -- internals -----------------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._opened:
            raise SinkError("DeltaSink.open() must be called before writing")
        if self._stale:
            raise PositionConflict(
                f"{redact(self.location.uri)}: a commit conflicted; open() the sink again to "
                "read the current position"
            )
        if self._table is not None and self._table.transaction_version(self.app_id) != (
            self._version
        ):
            # Maintenance refreshed the snapshot and it holds another writer's position.
            self._stale = True
            raise PositionConflict(
                f"{redact(self.location.uri)}: another writer moved the position of "
                f"{self.app_id!r} to {self._table.transaction_version(self.app_id)}; open() again"
            )

    def _load(self, uri: str) -> DeltaTable | None:
        try:
            return DeltaTable(uri, storage_options=self._options)
        except TableNotFoundError:
            return None
        except Exception as exc:
            raise SinkError(
                f"cannot open Delta table {redact(uri)}: {_clean(exc)}. Check the storage root "
                "and its storage options (credentials, region, endpoint)"
            ) from None

    def _find_stream_created(self) -> str | None:
        if self._table is None:
            return None
        history = self._table.history(_HISTORY_SCAN)
        if len(history) == _HISTORY_SCAN:
            found = _created_in(history)
            if found is not None:
                return found
            history = self._table.history()
        return _created_in(history)

    def _metadata(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        # Every commit carries the stream's creation time forward, so the newest commit
        # answers open() without a long history scan.
        metadata: dict[str, str] = {}
        if self._stream_created is not None:
            metadata[STREAM_CREATED_KEY] = self._stream_created
        metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
        return metadata

    def _properties(self, version: int | None, metadata: Mapping[str, str]) -> CommitProperties:
        txn = [Transaction(self.app_id, version)] if version is not None else None
        return CommitProperties(custom_metadata=dict(metadata) or None, app_transactions=txn)

    def _create(self, uri: str, rows: pa.Table, version: int | None) -> DeltaTable:
        """Create the table with ``rows``' schema and no data; return a snapshot to write through.

        Creating it with the data would save a commit, but two writers creating a table at
        once both succeed (measured on deltalake 1.6.6: the second create is rebased onto the
        first without the txn check), writing the first batch twice. An empty create is
        harmless twice over; the data then goes through a snapshot whose txn is checked.
        """
        write_deltalake(uri, rows.slice(0, 0), mode="ignore", storage_options=self._options)
        table = DeltaTable(uri, storage_options=self._options)
        found = table.transaction_version(self.app_id)
        if found != version:
            self._stale = True
            raise PositionConflict(
                f"another writer created {redact(uri)} and committed up to {found} since it was "
                "opened; open() again to read the current position"
            )
        return table

    def _empty_rows(self) -> pa.Table:
        assert self._table is not None
        return pa.schema(self._table.schema().to_arrow()).empty_table()

    def _write(
        self,
        table: DeltaTable,
        rows: pa.Table,
        mode: Literal["append", "overwrite"],
        properties: CommitProperties,
        predicate: str | None = None,
    ) -> None:
        rows = _one_chunk_layout(rows)
        if mode == "append":
            write_deltalake(
                table, rows, mode="append", schema_mode="merge", commit_properties=properties
            )
        else:
            write_deltalake(
                table,
                rows,
                mode="overwrite",
                predicate=predicate,
                schema_mode="merge",
                commit_properties=properties,
            )

    def _merge(
        self, rows: pa.Table, properties: CommitProperties, when: str, move: bool = True
    ) -> None:
        assert self._table is not None
        before = self._table.version()
        target = set(self._table.schema().to_arrow().names)
        if rows.num_rows and not set(self.primary_key) <= target:
            # No table row has a key yet, so nothing can match: insert (merge would fail to
            # resolve the key column on the target side).
            self._write(self._table, _latest_per_key(rows, self.primary_key), "append", properties)
        elif rows.num_rows:
            source = _one_chunk_layout(_latest_per_key(rows, self.primary_key))
            on = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in self.primary_key)
            (
                self._table.merge(
                    source,
                    on,
                    source_alias="s",
                    target_alias="t",
                    merge_schema=True,
                    commit_properties=properties,
                )
                .when_matched_update_all(predicate=when)
                .when_not_matched_insert_all()
                .execute()
            )
        if move and self._table.version() == before:
            # A merge that changes nothing commits nothing (measured), so the position
            # would not move: commit it with an empty append through the same snapshot.
            self._write(self._table, rows.slice(0, 0), "append", properties)

    def _write_dead_letters(
        self, dead: pa.Table | None, last_seq: int, metadata: Mapping[str, str]
    ) -> int:
        if dead is None or dead.num_rows == 0:
            return 0
        if self._dead_version is not None:
            # Written already by an attempt whose main commit then failed.
            dead = _after(dead, self._dead_version)
            if dead.num_rows == 0:
                return 0
        properties = self._properties(last_seq, metadata)
        try:
            if self._dead is None:
                uri = self.dead_letter_location.uri
                self._dead = self._create(uri, dead, self._dead_version)
            write_deltalake(
                self._dead, dead, mode="append", schema_mode="merge", commit_properties=properties
            )
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "commit to", dead=True) from None
        self._dead_version = last_seq
        return dead.num_rows

    def _maintain(self, metadata: Mapping[str, str]) -> None:
        table = self._table
        if table is None:
            return
        if self.compact_every and self._commits % self.compact_every == 0:
            try:
                table.optimize.compact(
                    commit_properties=CommitProperties(custom_metadata=dict(metadata) or None)
                )
            except (CommitFailedError, DeltaError) as exc:
                # Compaction is an optimisation; a concurrent merge or overwrite wins.
                logger.warning("%s: compaction skipped: %s", redact(self.location.uri), _clean(exc))
        if self.checkpoint_every and self._commits % self.checkpoint_every == 0:
            try:
                table.create_checkpoint()
            except DeltaError as exc:
                logger.warning("%s: checkpoint skipped: %s", redact(self.location.uri), _clean(exc))

    def _error(self, exc: Exception, action: str, dead: bool = False) -> SinkError:
        uri = (self.dead_letter_location if dead else self.location).uri
        text = _clean(exc)
        if isinstance(exc, CommitFailedError) or "already exists" in text:
            self._stale = True
            return PositionConflict(
                f"another writer committed to {redact(uri)} since it was opened ({text}); "
                "open() again to read the current position"
            )
        if isinstance(exc, SinkError):
            return exc
        return SinkError(f"cannot {action} Delta table {redact(uri)}: {text}")


class _Payloads(Mapping[int, bytes]):
    """A batch's payloads by sequence, indexed only if a dead letter needs one."""

    def __init__(self, batch: MessageBatch):
        self._batch = batch
        self._index: dict[int, bytes] | None = None

    def _lookup(self) -> dict[int, bytes]:
        if self._index is None:
            self._index = dict(zip(self._batch.sequences, self._batch.payloads, strict=True))
        return self._index

    def __getitem__(self, seq: int) -> bytes:
        return self._lookup()[seq]

    def __iter__(self) -> Iterator[int]:
        return iter(self._batch.sequences)

    def __len__(self) -> int:
        return len(self._batch)


def _latest_per_key(rows: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Keep, for each key, only the row of the latest message (highest ``_nats_seq``).

    Rows with a null key never match a table row, so they are all kept.
    """
    missing = [k for k in keys if k not in rows.column_names]
    if missing:
        raise SinkError(
            f"primary_key column(s) {missing} are not in the rows: every message of a merge "
            "pipeline must carry its key fields"
        )
    seq = rows.column("_nats_seq")
    order = pc.sort_indices(seq)  # stable; batches arrive sorted, so this is usually identity
    rows = rows.take(order)
    numbered = rows.select(list(keys)).append_column(
        "__row", pa.array(range(rows.num_rows), pa.int64())
    )
    null_key = pc.is_null(numbered.column(keys[0]))
    for key in keys[1:]:
        null_key = pc.or_(null_key, pc.is_null(numbered.column(key)))
    keyed = numbered.filter(pc.invert(null_key))
    latest = keyed.group_by(list(keys), use_threads=False).aggregate([("__row", "max")])
    if latest.num_rows == rows.num_rows:
        return rows
    keep = pa.concat_arrays(
        [
            latest.column("__row_max").combine_chunks(),
            numbered.filter(null_key).column("__row").combine_chunks(),
        ]
    )
    return rows.take(keep.take(pc.sort_indices(keep)))


def _one_chunk_layout(rows: pa.Table) -> pa.Table:
    """``rows`` with every column chunked alike (combined when they differ).

    Columns chunked differently reach deltalake as record batches that slice some columns;
    deltalake 1.6.6 (arrow-rs 59) panics on a sliced struct nested in a struct and aborts the
    process (measured: a >4 MB batch, read by Arrow in two blocks, padded with a single-chunk
    null column for a table's nested struct column missing from the batch).
    """
    layouts = {tuple(len(chunk) for chunk in column.chunks) for column in rows.columns}
    return rows if len(layouts) <= 1 else rows.combine_chunks()


def _after(table: pa.Table, position: int) -> pa.Table:
    if table.num_rows == 0 or position <= 0 or "_nats_seq" not in table.column_names:
        return table
    seq = table.column("_nats_seq")
    if pc.min(seq).as_py() > position:
        return table
    return table.filter(pc.greater(seq.cast(pa.int64()), position))


def _up_to(table: pa.Table | None, position: int) -> pa.Table | None:
    if table is None or table.num_rows == 0:
        return table
    return table.filter(pc.less_equal(table.column("_nats_seq").cast(pa.int64()), position))


def _in_window(table: pa.Table | None, start: datetime, end: datetime) -> pa.Table | None:
    if table is None or table.num_rows == 0:
        return table
    ts = table.column("_nats_timestamp").cast(TIMESTAMP_TYPE)
    lo = pa.scalar(start, TIMESTAMP_TYPE)
    hi = pa.scalar(end, TIMESTAMP_TYPE)
    return table.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))


def _created_in(history: Sequence[Mapping[str, object]]) -> str | None:
    for entry in history:  # newest first
        value = entry.get(STREAM_CREATED_KEY)
        if value is not None:
            return str(value)
    return None


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clean(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc))
    return redact(" ".join(text.split()))


__all__ = [
    "METADATA_COLUMNS",
    "STREAM_CREATED_KEY",
    "CommitResult",
    "DeltaSink",
    "PositionConflict",
    "SinkState",
]
