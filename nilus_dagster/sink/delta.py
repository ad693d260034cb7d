"""The Delta Lake sink: rows, dead letters and the stream position in one transaction.

The position is a Delta transaction identifier (``txn``: app id = the pipeline, version = the
last stream sequence written) committed atomically with the rows. It is read from the snapshot
that the next commit is written through, never from a fresh one: a second writer that commits
in between makes that commit fail (``CommitFailedError``), which surfaces here as
:class:`PositionConflict`. Writing by URI instead would load a fresh snapshot and let the
duplicate through (measured on deltalake 1.6.6).
"""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import ClassVar

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import DEAD_LETTER_SUFFIX, TableLocation
from nilus_dagster.manifest.model import (
    DEFAULT_COMPACT_EVERY,
    LOCAL_CHECKPOINT_EVERY,
    REMOTE_CHECKPOINT_EVERY,
    IncrementalStrategy,
)
from nilus_dagster.redaction import redact
from nilus_dagster.sink.delta_append import AppendConflict, DirectAppends
from nilus_dagster.sink.delta_facts import (
    find_stream_created,
    newest_timestamp,
    read_delta_schema,
)
from nilus_dagster.sink.delta_maintenance import (
    bound_log_retention,
    checkpoint_interval,
    maintain_table,
    maintenance_due,
    table_configuration,
)
from nilus_dagster.sink.delta_writes import (
    commit_properties,
    create_empty_table,
    load_table,
    merge_rows,
    window_predicate,
    write_error,
    write_rows,
)
from nilus_dagster.sink.partitioning import check_partition_columns, check_partitioning
from nilus_dagster.sink.rows import after_position
from nilus_dagster.sink.schema import METADATA_SCHEMA
from nilus_dagster.sink.writer import (
    STREAM_CREATED_KEY,
    CommitResult,
    PositionConflict,
    SinkState,
    SinkWriter,
)

# What deltalake raises for a failed write (object stores surface as OSError); anything else
# is a bug and propagates as is.
_WRITE_ERRORS = (DeltaError, AppendConflict, OSError, pa.ArrowException)


class DeltaSink(SinkWriter):
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
        compact_every: Run ``optimize.compact()`` every this many table versions (0 disables).
        checkpoint_every: Write a checkpoint every this many table versions; ``None``: 100 on
            a local file system, 10 on object stores. 0: only at Delta's own interval,
            ``delta.checkpointInterval`` (taken by the sink after the commits it writes
            directly, which deltalake's own checkpointing does not see).
        log_retention_hours: ``delta.logRetentionDuration`` of the tables it creates;
            ``None``: 15 minutes on a local file system, Delta's default (30 days) elsewhere.
        partition_by: Partition columns, set when the table is created (checked against the
            first rows' columns then, and against an existing table's partitioning on open).
    """

    kind: ClassVar[str] = "delta"
    writer_options: ClassVar[tuple[str, ...]] = (
        "compact_every",
        "checkpoint_every",
        "log_retention_hours",
        "partition_by",
    )

    def __init__(
        self,
        location: TableLocation,
        *,
        app_id: str,
        strategy: IncrementalStrategy = "append",
        primary_key: Sequence[str] | None = None,
        create_table: bool = True,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        checkpoint_every: int | None = None,
        log_retention_hours: float | None = None,
        partition_by: Sequence[str] | None = None,
    ):
        super().__init__(
            location,
            app_id=app_id,
            strategy=strategy,
            primary_key=primary_key,
            create_table=create_table,
        )
        self.dead_letter_location = location.sibling(DEAD_LETTER_SUFFIX)
        self.compact_every = compact_every
        if checkpoint_every is None:
            # A reader replays the log entries after the last checkpoint: cheap local files,
            # a request each on an object store. A checkpoint costs the writer about 25 ms.
            local = location.is_local
            checkpoint_every = LOCAL_CHECKPOINT_EVERY if local else REMOTE_CHECKPOINT_EVERY
        self.checkpoint_every = checkpoint_every
        self.log_retention_hours = log_retention_hours
        self._retention_bounded = False  # an existing table's, checked at the first commit
        self.partition_by = tuple(partition_by or ())
        self._options = {str(k): str(v) for k, v in location.storage_options.items()} or None
        self._table: DeltaTable | None = None
        self._dead: DeltaTable | None = None
        self._version: int | None = None  # txn version as read; None when never committed
        self._dead_version: int | None = None
        self._stream_created: str | None = None
        self._schema: tuple[int, pa.Schema] | None = None
        self._direct = DirectAppends(location, app_id)

    @classmethod
    def read_schema(cls, location: TableLocation) -> pa.Schema | None:
        """The Delta table's schema from its log (no data files), ``None`` without a table."""
        return read_delta_schema(location)

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
        self._direct.appended = None
        if self._table is not None:
            check_partitioning(
                self.partition_by, self._table.metadata().partition_columns, self.location.uri
            )
        self._version = self._table.transaction_version(self.app_id) if self._table else None
        self._dead = self._load(self.dead_letter_location.uri)
        self._dead_version = self._dead.transaction_version(self.app_id) if self._dead else None
        self._stream_created = find_stream_created(self._table) if self._table else None
        return self._opened_state(
            exists=self._table is not None, stream_created=self._stream_created
        )

    @property
    def position(self) -> int:
        """Last stream sequence committed by this app id (0 when none), as of the snapshot."""
        return self._version or 0

    @property
    def table_version(self) -> int | None:
        """The Delta table's version as of the last commit or read, ``None`` without a table."""
        if self._table is None:
            return None
        appended = self._direct.appended
        return appended if appended is not None else self._table.version()

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
        self._catch_up()
        return self._table.count()

    def newest_timestamp(self) -> datetime | None:
        """The newest ``_nats_timestamp`` in the table (from file statistics when present)."""
        if self._table is None:
            return None
        self._catch_up()
        return newest_timestamp(self._table)

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
        if self._table is not None and not self._retention_bounded:
            self._retention_bounded = True
            bound_log_retention(self._table, self.location, self.log_retention_hours, metadata)
            # That commit may have taken in another writer's since open(): check again.
            self._require_open()
        if rows is None or rows.num_columns == 0:
            rows = METADATA_SCHEMA.empty_table()
        rows = after_position(rows, self.position)
        if self._table is None:
            check_partition_columns(self.partition_by, rows, self.location.uri)  # before writing
        dead_count = self._write_dead_letters(dead_letters, last_seq, metadata)
        properties = self._properties(last_seq, metadata)
        try:
            if self._table is None:
                self._table = self._create(self.location.uri, rows, self._version)
            before = self.table_version
            assert before is not None
            appending = self.strategy == "append" or (self.strategy == "replace" and not overwrite)
            schema = self.schema() if appending else None
            direct = schema is not None and self._direct.append(
                self._table, rows, schema, before, last_seq=last_seq, metadata=metadata
            )
            if not direct:
                self._sync_snapshot()
                if self.strategy == "merge":
                    when = "t.`_nats_seq` < s.`_nats_seq`"
                    merge_rows(self._table, rows, self.primary_key, properties, when=when)
                else:
                    mode = "overwrite" if overwrite else "append"
                    write_rows(self._table, rows, mode, properties)
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "commit to") from None
        self._version = last_seq
        self._stream_created = metadata.get(STREAM_CREATED_KEY, self._stream_created)
        version = self.table_version  # the one this commit made: maintenance goes by it
        assert version is not None
        checkpoint_every = self.checkpoint_every
        if not checkpoint_every and direct:
            # deltalake checkpoints at its own interval only after the commits it makes.
            checkpoint_every = checkpoint_interval(self._table)
        if maintenance_due(self.location, version, self.compact_every, checkpoint_every):
            self._catch_up()
            maintain_table(
                self._table,
                self.location,
                version=version,
                compact_every=self.compact_every,
                checkpoint_every=checkpoint_every,
                metadata=metadata,
            )
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
        re-run changes nothing. The position does not move: the commit carries no ``txn``, so
        a service appending meanwhile does not conflict with it. Dead letters (when given)
        replace the dead-letter table's rows of the window the same way, with that table's
        ``txn``: a concurrent commit of dead letters conflicts, and the replay tries again,
        rather than move that table's position back.

        Raises:
            PositionConflict: Another writer committed since :meth:`open`; re-open.
            SinkError: The write failed.
        """
        self._require_open()
        self._sync_snapshot()
        replay = self.replay_window(rows, dead_letters, start, end, up_to)
        metadata = self._metadata(commit_metadata)
        predicate = window_predicate(replay.start, replay.end, replay.up_to)
        rows, dead = replay.rows, replay.dead_letters
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
        # No txn: the position is not this commit's to set. A service appending meanwhile
        # (rows after ``up_to``, in files whose statistics say so) does not conflict with it;
        # with the txn, frequent small appends kept a replay retrying until they paused.
        properties = self._properties(None, metadata)
        if self._table is None and (rows is None or rows.num_rows == 0):
            return CommitResult(0, dead_count, None, self.position)
        try:
            if self._table is None:
                assert rows is not None
                self._table = self._create(self.location.uri, rows, self._version)
            schema = self.schema()
            assert schema is not None
            source = rows if rows is not None else schema.empty_table()
            if self.strategy == "merge":
                when = "t.`_nats_seq` <= s.`_nats_seq`"
                merge_rows(
                    self._table, source, self.primary_key, properties, when=when, commit=False
                )
            else:
                write_rows(self._table, source, "overwrite", properties, predicate=predicate)
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "replace the window of") from None
        written = source.num_rows
        self._stream_created = metadata.get(STREAM_CREATED_KEY, self._stream_created)
        return CommitResult(written, dead_count, self.table_version, self.position)

    # -- internals -----------------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Bring the snapshot up to the table's newest version after direct appends."""
        if self._direct.appended is not None and self._table is not None:
            try:
                self._table.update_incremental()
            except DeltaError:  # its next entries were cleaned: the next commit re-checks
                self._table = self._load(self.location.uri)
            self._direct.appended = None

    def _sync_snapshot(self) -> None:
        """Catch up before deltalake writes, and check that the position is still this run's."""
        if self._direct.appended is not None:
            self._catch_up()
            self._require_open()

    def _require_open(self) -> None:
        super()._require_open()
        if self._direct.appended is not None:
            # Direct appends check the position themselves; the snapshot is behind them.
            return
        found = self._snapshot_position()
        if self._table is not None and found != self._version:
            # Maintenance refreshed the snapshot and it holds another writer's position.
            self._stale = True
            raise PositionConflict(
                f"{redact(self.location.uri)}: another writer moved the position of "
                f"{self.app_id!r} to {found}; open() again"
            )

    def _snapshot_position(self) -> int | None:
        """The pipeline's ``txn`` version in the snapshot, read afresh if its log was cleaned."""
        if self._table is None:
            return None
        try:
            return self._table.transaction_version(self.app_id)
        except DeltaError:
            # The entries this snapshot still had to read are gone: the writer was quiet for
            # longer than the log retention while others committed. A fresh snapshot holding
            # the same position is as good to write through.
            self._table = self._load(self.location.uri)
            return self._table.transaction_version(self.app_id) if self._table else None

    def _load(self, uri: str) -> DeltaTable | None:
        return load_table(uri, self._options, self.location)

    def _metadata(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        # Every commit carries the stream's creation time forward, so the newest commit
        # answers open() without a long history scan.
        metadata: dict[str, str] = {}
        if self._stream_created is not None:
            metadata[STREAM_CREATED_KEY] = self._stream_created
        metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
        return metadata

    def _properties(self, version: int | None, metadata: Mapping[str, str]) -> CommitProperties:
        return commit_properties(self.app_id, version, metadata)

    def _create(self, uri: str, rows: pa.Table, version: int | None) -> DeltaTable:
        """Create the table with ``rows``' schema and no data; return a snapshot to write through.

        Creating it with the data would save a commit, but two writers creating a table at
        once both succeed (measured on deltalake 1.6.6: the second create is rebased onto the
        first without the txn check), writing the first batch twice. An empty create is
        harmless twice over; the data then goes through a snapshot whose txn is checked.
        """
        main = uri == self.location.uri
        if main:
            check_partition_columns(self.partition_by, rows, uri)
            self._retention_bounded = True  # created with it: nothing to set at the next commit
        table = create_empty_table(
            uri,
            rows.schema,
            partition_by=self.partition_by if main else (),
            configuration=table_configuration(self.location, self.log_retention_hours),
            storage_options=self._options,
        )
        found = table.transaction_version(self.app_id)
        if found != version:
            self._stale = True
            raise PositionConflict(
                f"another writer created {redact(uri)} and committed up to {found} since it was "
                "opened; open() again to read the current position"
            )
        return table

    def _write_dead_letters(
        self, dead: pa.Table | None, last_seq: int, metadata: Mapping[str, str]
    ) -> int:
        if dead is None or dead.num_rows == 0:
            return 0
        if self._dead_version is not None:
            # Written already by an attempt whose main commit then failed.
            dead = after_position(dead, self._dead_version)
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

    def _error(self, exc: Exception, action: str, dead: bool = False) -> SinkError:
        error = write_error(exc, action, (self.dead_letter_location if dead else self.location))
        self._stale = self._stale or isinstance(error, PositionConflict)
        return error


__all__ = [
    "STREAM_CREATED_KEY",
    "CommitResult",
    "DeltaSink",
    "PositionConflict",
    "SinkState",
]
