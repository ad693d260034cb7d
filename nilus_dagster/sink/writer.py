"""The sink-writer interface: what the engine needs from a table, whatever store holds it.

A writer owns one table (and its dead-letter table) and the pipeline's position in it. The
engine calls, in this order: :meth:`SinkWriter.open` (reads the position and the creation time
of the stream it belongs to), :meth:`SinkWriter.prepare` per batch (the shared Arrow decoding,
conformed to the table), :meth:`SinkWriter.commit` per chunk (rows, dead letters and the new
position in one atomic step) or :meth:`SinkWriter.replace_window` for a backfill, and the table
facts (:meth:`SinkWriter.row_count`, :meth:`SinkWriter.newest_timestamp`,
:meth:`SinkWriter.schema`) for the run metadata. A commit that loses a race with another writer
raises :class:`PositionConflict`; the engine then opens again and keeps only what is still its
own to write.
"""

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

import pyarrow as pa

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.address import PayloadFormat
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.manifest.model import IncrementalStrategy, SinkOptions
from nilus_dagster.messages import MessageBatch
from nilus_dagster.redaction import redact
from nilus_dagster.sink.conform import conform
from nilus_dagster.sink.decode import BatchDecoder, Decoded, decode
from nilus_dagster.sink.rows import in_window, up_to_position
from nilus_dagster.times import as_utc

STREAM_CREATED_KEY = "nilus.stream_created"
"""Commit metadata key holding the creation time of the stream the position belongs to."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PositionConflict(SinkError):
    """Another writer committed to the table since it was opened: re-open, re-read the position."""


@dataclass(frozen=True)
class SinkState:
    """What :meth:`SinkWriter.open` found.

    Attributes:
        exists: Whether the table exists yet.
        position: Last stream sequence committed by this pipeline, 0 when none.
        stream_created: The creation time of the stream the position belongs to (ISO text,
            as committed with the position), or ``None``.
        schema: The table's schema as Arrow, ``None`` when it does not exist.
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
        table_version: The table's version after the commit, where the store has one.
        position: The committed position.
    """

    rows_written: int
    dead_letters: int
    table_version: int | None
    position: int


@dataclass(frozen=True)
class TableFacts:
    """What the run metadata and the asset's column schema say about a table.

    Attributes:
        uri: Where the table is, for people and downstream loaders (never holds a secret).
        exists: Whether the table exists yet.
        schema: Its columns as Arrow (``None`` when it does not exist).
        row_count: Rows in the table.
        newest_timestamp: The newest ``_nats_timestamp`` in it, ``None`` when empty.
    """

    uri: str
    exists: bool
    schema: pa.Schema | None
    row_count: int
    newest_timestamp: datetime | None


@dataclass(frozen=True)
class ReplayWindow:
    """What a window replacement writes: the UTC bounds, the sequence bound, and the rows.

    Attributes:
        start: The window's start (UTC, inclusive).
        end: The window's end (UTC, exclusive).
        up_to: Only rows with ``_nats_seq <= up_to`` are replaced and written.
        rows: The given rows inside the window and the bound (``None`` when none were given).
        dead_letters: The same for the given dead letters.
    """

    start: datetime
    end: datetime
    up_to: int
    rows: pa.Table | None
    dead_letters: pa.Table | None


class SinkWriter(ABC):
    """Writes decoded batches to one table, exactly once, with the position in the same commit.

    Args:
        location: Where the table is (:class:`~nilus_dagster.manifest.depots.TableLocation`).
        app_id: The pipeline's id in the store: the position is kept under it.
        strategy: ``append`` inserts; ``merge`` upserts on ``primary_key``, a row being replaced
            only by a message with a higher stream sequence; ``replace`` overwrites the table
            on the first commit of a run and appends after that.
        primary_key: Merge key columns (required for ``merge``).
        create_table: Create the table with the first commit; ``False`` makes a missing table
            an error.
    """

    kind: ClassVar[str]
    """The depot ``type`` this writer serves (``delta``, ``postgresql``...)."""
    writer_options: ClassVar[tuple[str, ...]] = ()
    """Names of ``spec.sink.options`` fields passed on to this writer's constructor."""

    def __init__(
        self,
        location: TableLocation,
        *,
        app_id: str,
        strategy: IncrementalStrategy = "append",
        primary_key: Sequence[str] | None = None,
        create_table: bool = True,
    ):
        if strategy not in ("append", "merge", "replace"):
            raise SinkError(f"incremental_strategy must be append, merge or replace: {strategy!r}")
        if strategy == "merge" and not primary_key:
            raise SinkError("incremental_strategy merge needs a primary_key to merge on")
        self.location = location
        self.app_id = app_id
        self.strategy: IncrementalStrategy = strategy
        self.primary_key = tuple(primary_key or ())
        self.create_table = create_table
        self._decoders: dict[str, BatchDecoder] = {}
        self._required = self.primary_key if strategy == "merge" else ()
        self._opened = False
        self._stale = False  # a commit conflicted: the position must be read again

    @classmethod
    def from_options(
        cls, location: TableLocation, options: SinkOptions, *, app_id: str
    ) -> "SinkWriter":
        """A writer for a manifest's ``spec.sink.options`` (each writer takes what it uses).

        Raises:
            SinkError: ``partition_by`` is set for a store whose tables are not partitioned.
        """
        if options.partition_by and "partition_by" not in cls.writer_options:
            raise SinkError(
                f"partition_by is for lakehouse tables; the {cls.kind} sink does not partition "
                "its tables: remove partition_by from spec.sink.options"
            )
        return cls(
            location,
            app_id=app_id,
            strategy=options.incremental_strategy,
            primary_key=options.primary_key,
            create_table=options.create_table,
            **{name: getattr(options, name) for name in cls.writer_options},
        )

    # -- reading -------------------------------------------------------------------------------

    @abstractmethod
    def open(self) -> SinkState:
        """Read the committed position and the table's shape (call again after a conflict).

        Raises:
            SinkError: The table is missing and ``create_table`` is false, or the store
                cannot be reached.
        """

    def _opened_state(self, *, exists: bool, stream_created: str | None) -> SinkState:
        """Mark the writer open and current, and describe what :meth:`open` read."""
        self._opened = True
        self._stale = False
        return SinkState(
            exists=exists,
            position=self.position,
            stream_created=stream_created,
            schema=self.schema(),
        )

    def _require_open(self) -> None:
        """Check the writer may write: opened, and no conflict since.

        Raises:
            SinkError: :meth:`open` was not called.
            PositionConflict: A commit conflicted; the position must be read again.
        """
        if not self._opened:
            raise SinkError(f"{type(self).__name__}.open() must be called before writing")
        if self._stale:
            raise PositionConflict(
                f"{redact(self.table_uri)}: a commit conflicted; open() the sink again to read "
                "the current position"
            )

    @property
    @abstractmethod
    def position(self) -> int:
        """Last stream sequence committed by this pipeline (0 when none), as of :meth:`open`."""

    @abstractmethod
    def schema(self) -> pa.Schema | None:
        """The table's schema as Arrow, or ``None`` when the table does not exist."""

    @abstractmethod
    def row_count(self) -> int:
        """Rows in the table (0 when it does not exist)."""

    def counted_rows(self) -> tuple[int | None, bool]:
        """``(rows, estimated)``: the table's rows for run metadata, and if that is an estimate.

        The table formats count from their own metadata, so by default this is
        :meth:`row_count`; a database may answer with its estimate where a count would scan a
        large table at every run and report, and with ``None`` where it can do neither.
        """
        return self.row_count(), False

    @abstractmethod
    def newest_timestamp(self) -> datetime | None:
        """The newest ``_nats_timestamp`` in the table, ``None`` when it is empty or missing."""

    @property
    def table_uri(self) -> str:
        """Where the table is, for people and downstream loaders (holds no secret)."""
        return self.location.uri

    @property
    def table_version(self) -> int | None:
        """The table's version, where the store numbers them."""
        return None

    def table_facts(self) -> TableFacts:
        """The table's facts for metadata, as of :meth:`open` or the last commit."""
        schema = self.schema()
        exists = schema is not None
        return TableFacts(
            uri=self.table_uri,
            exists=exists,
            schema=schema,
            row_count=self.row_count() if exists else 0,
            newest_timestamp=self.newest_timestamp() if exists else None,
        )

    @classmethod
    @abstractmethod
    def read_schema(cls, location: TableLocation) -> pa.Schema | None:
        """The schema of the table at ``location``, without opening a writer.

        ``None`` when there is no table or it cannot be read (for the asset's column schema).
        """

    # -- decoding ------------------------------------------------------------------------------

    def prepare(
        self,
        batch: MessageBatch,
        *,
        format: PayloadFormat = "json",
        decoder: BatchDecoder | None = None,
    ) -> Decoded:
        """Decode ``batch`` for this table: the shared decoding, then :meth:`conform`.

        Better than the two calls apart: when the batch's messages disagree on a field's
        type, the table's type decides which are dead letters, and dead letters found by
        conforming keep their exact payload bytes.

        Args:
            batch: The messages to write.
            format: The pipeline's payload format.
            decoder: The decoder to use; by default the writer keeps one per format, which
                learns the payloads' fields across batches.

        Returns:
            Conformed rows and all dead letters (decoding's, then conforming's).
        """
        schema = self.conform_schema()
        if decoder is None:
            decoder = self._decoders.setdefault(format, BatchDecoder(format))
        decoded = decode(batch, format, decoder=decoder, table_schema=schema)
        rows, conflicts = conform(
            decoded.rows, schema, payloads=BatchPayloads(batch), required=self._required
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
        return conform(rows, self.conform_schema(), payloads=payloads, required=self._required)

    def conform_schema(self) -> pa.Schema | None:
        """The columns rows are conformed to (and can conflict with): the table's by default."""
        return self.schema()

    # -- writing -------------------------------------------------------------------------------

    @abstractmethod
    def commit(
        self,
        rows: pa.Table | None,
        dead_letters: pa.Table | None,
        *,
        last_seq: int,
        overwrite: bool = False,
        commit_metadata: Mapping[str, str] | None = None,
    ) -> CommitResult:
        """Write ``rows`` and ``dead_letters`` and move the position to ``last_seq``, atomically.

        Rows at or below the position are dropped (written already). Zero rows still commit
        the position.

        Args:
            rows: Conformed rows, each with ``_nats_seq <= last_seq``.
            dead_letters: Dead letters of the same messages.
            last_seq: The stream sequence of the last message these rows cover.
            overwrite: ``replace`` strategy: replace the whole table (first commit of a run).
            commit_metadata: Extra text kept with the commit; :data:`STREAM_CREATED_KEY` in it
                is stored with the position and read back by :meth:`open`.

        Raises:
            PositionConflict: Another writer committed since :meth:`open`; re-open.
            SinkError: ``last_seq`` is not past the position, or the write failed.
        """

    def write_ahead(self, decoded: Decoded, *, last_seq: int) -> bool:
        """Write part of the coming commit's rows now, into that commit's open transaction.

        For stores whose commit is a transaction that can take rows bit by bit (PostgreSQL):
        the engine hands over each part of a chunk as it is decoded, so the load runs while
        the pull goes on instead of all at the commit. Nothing is visible, and the position
        does not move, until :meth:`commit` (which then writes its own rows on top); an
        :meth:`open`, :meth:`discard_ahead` or a failed commit drops what was written ahead.
        Writers that cannot do this keep the default, which writes nothing.

        Args:
            decoded: Conformed rows and dead letters of the part (from :meth:`prepare`).
            last_seq: The stream sequence of the part's last message.

        Returns:
            Whether the part was written (``False``: give its rows to :meth:`commit`).

        Raises:
            SinkError: The write failed; what was written ahead is dropped. The engine then
                gives the whole chunk to :meth:`commit`, which meets the same cause.
        """
        return False

    def discard_ahead(self) -> None:  # noqa: B027 - nothing written ahead by default
        """Drop what :meth:`write_ahead` wrote since the last commit (the commit gets it all)."""

    def replay_window(
        self,
        rows: pa.Table | None,
        dead_letters: pa.Table | None,
        start: datetime,
        end: datetime,
        up_to: int | None,
    ) -> ReplayWindow:
        """The part of a replay :meth:`replace_window` writes, the same for every writer.

        Messages past the position are the next normal run's to write (writing them here would
        write them twice), and past ``up_to`` the appending writer's (a service run).

        Raises:
            SinkError: The window is empty.
        """
        start, end = as_utc(start), as_utc(end)
        if end <= start:
            raise SinkError(f"empty window {start.isoformat()}..{end.isoformat()}")
        up_to = self.position if up_to is None else min(up_to, self.position)
        return ReplayWindow(
            start,
            end,
            up_to,
            up_to_position(in_window(rows, start, end), up_to),
            up_to_position(in_window(dead_letters, start, end), up_to),
        )

    @abstractmethod
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
        """Replace the rows whose ``_nats_timestamp`` is in ``[start, end)`` (a backfill).

        Only rows with ``_nats_seq <= up_to`` (default: the position) are replaced and written:
        the replay read the stream up to there, and later messages belong to the writer that
        keeps appending (a service run), which may commit in between; retried after a
        :class:`PositionConflict`, the same rows replace the same rows. The position does not
        move, so replaying a window twice changes nothing. For ``merge`` the window's rows are
        merged under the higher-sequence rule.

        Raises:
            PositionConflict: Another writer committed since :meth:`open`; re-open.
            SinkError: The write failed.
        """

    def close(self) -> None:  # noqa: B027 - writers without connections have nothing to close
        """Release connections; the writer may be opened again afterwards."""

    def __enter__(self) -> "SinkWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchPayloads(Mapping[int, bytes]):
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


def error_text(exc: BaseException) -> str:
    """A store's error as one redacted line (no colour codes), to quote in a clear error."""
    text = _ANSI.sub("", str(exc))
    return redact(" ".join(text.split()))
