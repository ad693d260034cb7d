"""The Apache Iceberg sink: rows and the stream position in one catalog commit.

The position lives in the snapshot summary of every commit (``nilus.pipeline``,
``nilus.last_seq``, ``nilus.stream_created``) and is read from the current snapshot's ancestry:
the newest snapshot of this pipeline. Every commit goes through the table object the position
was read from, so it asserts that the branch head is still that snapshot; the catalog's
compare-and-swap on the metadata location rejects a commit that lost a race with another writer,
which surfaces here as :class:`PositionConflict`. pyiceberg's own retry (re-applying the
commit on top of the winner) is switched off on every table the sink writes, because it would
write the same messages twice.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError
from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    GreaterThanOrEqual,
    LessThan,
    LessThanOrEqual,
)
from pyiceberg.table import Table, Transaction

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import DEAD_LETTER_SUFFIX, TableLocation
from nilus_dagster.manifest.model import (
    DEFAULT_COMPACT_EVERY,
    DEFAULT_EXPIRE_EVERY,
    DEFAULT_KEEP_SNAPSHOTS,
    IncrementalStrategy,
)
from nilus_dagster.redaction import redact
from nilus_dagster.sink import iceberg_catalog as cat
from nilus_dagster.sink.iceberg_maintenance import maintain_table
from nilus_dagster.sink.iceberg_position import (
    LAST_SEQ_KEY,
    PIPELINE_KEY,
    position_summary,
    read_position,
)
from nilus_dagster.sink.iceberg_rows import (
    evolve,
    merge_plan,
    missing_properties,
    newest_timestamp,
    quiet_overwrites,
    storable,
)
from nilus_dagster.sink.rows import after_position, latest_per_key
from nilus_dagster.sink.schema import METADATA_SCHEMA
from nilus_dagster.sink.writer import (
    STREAM_CREATED_KEY,
    CommitResult,
    PositionConflict,
    SinkState,
    SinkWriter,
)

if TYPE_CHECKING:
    from nilus_dagster.manifest.model import SinkOptions

# What a failed write raises (object stores surface as OSError); anything else is a bug.
_WRITE_ERRORS = (OSError, ValueError, pa.ArrowException, SinkError)


class IcebergSink(SinkWriter):
    """Writes decoded batches to one Iceberg table (and its dead-letter table), exactly once.

    Args:
        location: The table's location, its catalog properties and storage options.
        app_id: The pipeline's id: the ``nilus.pipeline`` of the snapshots holding its position.
        strategy: ``append`` inserts; ``merge`` upserts on ``primary_key``, a row being replaced
            only by a message with a higher stream sequence; ``replace`` overwrites the table
            on the first commit of a run and appends after that.
        primary_key: Merge key columns (required for ``merge``).
        create_table: Create the table with the first commit; ``False`` makes a missing table
            an error.
        partition_by: Partition spec of a new table: columns, or ``day(_nats_timestamp)``
            style transforms (``year``, ``month``, ``day``, ``hour``).
        compact_every: Rewrite small data files into larger ones every this many commits.
        expire_every: Expire old snapshots (and delete their files) every this many commits.
        keep_snapshots: Snapshots kept by expiry (the newest of each pipeline always is).
    """

    kind: ClassVar[str] = "iceberg"
    writer_options: ClassVar[tuple[str, ...]] = ("compact_every", "expire_every", "keep_snapshots")

    def __init__(
        self,
        location: TableLocation,
        *,
        app_id: str,
        strategy: IncrementalStrategy = "append",
        primary_key: Sequence[str] | None = None,
        create_table: bool = True,
        partition_by: Sequence[str] = (),
        compact_every: int = DEFAULT_COMPACT_EVERY,
        expire_every: int = DEFAULT_EXPIRE_EVERY,
        keep_snapshots: int = DEFAULT_KEEP_SNAPSHOTS,
    ):
        super().__init__(
            location,
            app_id=app_id,
            strategy=strategy,
            primary_key=primary_key,
            create_table=create_table,
        )
        self.dead_letter_location = location.sibling(DEAD_LETTER_SUFFIX)
        self.partition_fields = cat.partition_fields(partition_by)
        self.compact_every = compact_every
        self.expire_every = expire_every
        self.keep_snapshots = max(1, keep_snapshots)
        self.identifier = cat.identifier(location)
        self.dead_identifier = cat.identifier(self.dead_letter_location)
        self._catalog: Catalog | None = None
        self._table: Table | None = None
        self._dead: Table | None = None
        self._version: int | None = None
        self._dead_version: int | None = None
        self._stream_created: str | None = None
        self._commits = 0
        self._schema: tuple[int, pa.Schema] | None = None

    @classmethod
    def from_options(
        cls, location: TableLocation, options: "SinkOptions", *, app_id: str
    ) -> "IcebergSink":
        """As :meth:`SinkWriter.from_options`, with the manifest's ``partition_by``."""
        return cls(
            location,
            app_id=app_id,
            strategy=options.incremental_strategy,
            primary_key=options.primary_key,
            create_table=options.create_table,
            partition_by=tuple(getattr(options, "partition_by", None) or ()),
            **{name: getattr(options, name) for name in cls.writer_options},
        )

    @classmethod
    def read_schema(cls, location: TableLocation) -> pa.Schema | None:
        """The table's columns from its catalog, ``None`` without a catalog or a table."""
        if not cat.catalog_exists(location):
            return None  # reading a schema must not create an embedded catalog
        sink = cls(location, app_id="")
        try:
            sink.open()
            return sink.schema()
        except SinkError:
            return None
        finally:
            sink.close()

    # -- reading -------------------------------------------------------------------------------

    def open(self) -> SinkState:
        """Load the table from the catalog and read the committed position.

        Raises:
            SinkError: The catalog cannot be reached, or the table is missing and
                ``create_table`` is false.
        """
        if self._catalog is None:
            self._catalog = cat.connect(self.location)
        self._table = self._load(self.identifier)
        if self._table is None and not self.create_table:
            raise SinkError(
                f"Iceberg table {'.'.join(self.identifier)} does not exist in the catalog and "
                "create_table is false: create the table first, or set create_table: true "
                "under spec.sink.options to let the first run create it"
            )
        self._version, self._stream_created = read_position(self._table, self.app_id)
        self._dead = self._load(self.dead_identifier)
        self._dead_version = read_position(self._dead, self.app_id)[0]
        return self._opened_state(
            exists=self._table is not None, stream_created=self._stream_created
        )

    @property
    def position(self) -> int:
        """Last stream sequence committed by this pipeline (0 when none), as of the snapshot."""
        return self._version or 0

    @property
    def table_version(self) -> int | None:
        """The current snapshot id (Iceberg numbers snapshots by id, not by count)."""
        snapshot = self._table.current_snapshot() if self._table is not None else None
        return snapshot.snapshot_id if snapshot is not None else None

    def schema(self) -> pa.Schema | None:
        """The table's schema as Arrow, or ``None`` when the table does not exist."""
        if self._table is None:
            return None
        schema = self._table.schema()
        if self._schema is None or self._schema[0] != schema.schema_id:
            self._schema = (schema.schema_id, cat.arrow_schema(schema))
        return self._schema[1]

    def row_count(self) -> int:
        """Rows in the table, from the current snapshot's summary (no data read)."""
        snapshot = self._table.current_snapshot() if self._table is not None else None
        if snapshot is None or snapshot.summary is None:
            return 0
        total = snapshot.summary["total-records"]
        return int(total) if total is not None else self._table.scan().count()  # type: ignore[union-attr]

    def newest_timestamp(self) -> datetime | None:
        """The newest ``_nats_timestamp`` in the table, from the data files' column bounds."""
        return newest_timestamp(self._table) if self._table is not None else None

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
        """Write ``rows`` and move the position to ``last_seq`` in one catalog commit.

        Dead letters go first, to their own table under their own position. Then the rows, with
        the position in the snapshot summary, through the table the position was read from.

        Raises:
            PositionConflict: Another writer committed since :meth:`open`; re-open.
            SinkError: ``last_seq`` is not past the position, or the write failed.
        """
        self._require_open()
        if last_seq <= self.position:
            raise SinkError(
                f"refusing to commit up to sequence {last_seq}: {'.'.join(self.identifier)} "
                f"already holds everything up to {self.position} (drop what is at or below the "
                "position before committing)"
            )
        if rows is None or rows.num_columns == 0:
            rows = METADATA_SCHEMA.empty_table()
        rows = storable(after_position(rows, self.position), self.schema())
        properties = self._summary(last_seq, commit_metadata)
        dead_count = self._write_dead_letters(dead_letters, last_seq, properties)
        try:
            if self._table is None:
                keyed = self._required and rows.num_rows
                first = latest_per_key(rows, self.primary_key) if keyed else rows
                self._table = self._create(self.identifier, first, properties)
            else:
                with quiet_overwrites(), self._table.transaction() as txn:
                    evolve(txn, self._table, rows)
                    if self.strategy == "merge":
                        self._merge(txn, rows, properties, replace_equal=False)
                    elif self.strategy == "replace" and overwrite:
                        txn.overwrite(rows, AlwaysTrue(), snapshot_properties=properties)
                    else:
                        txn.append(rows, snapshot_properties=properties)
        except CommitFailedException as exc:
            raise self._conflict(exc) from None
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "commit to") from None
        self._version = last_seq
        self._stream_created = properties.get(STREAM_CREATED_KEY, self._stream_created)
        self._commits += 1
        self._maintain(properties)
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
        """Replace the rows whose ``_nats_timestamp`` is in ``[start, end)`` (a backfill).

        Only rows with ``_nats_seq <= up_to`` (default: the position) are replaced and written:
        later ones belong to the writer that keeps appending (a service run). The position
        does not move (the commit carries it unchanged), so replaying a window twice changes
        nothing. For ``merge`` the window's rows are merged under the higher-sequence rule.

        Raises:
            PositionConflict: Another writer committed since :meth:`open`; re-open.
            SinkError: The write failed.
        """
        self._require_open()
        replay = self.replay_window(rows, dead_letters, start, end, up_to)
        window: BooleanExpression = And(
            And(
                GreaterThanOrEqual("_nats_timestamp", replay.start.isoformat()),
                LessThan("_nats_timestamp", replay.end.isoformat()),
            ),
            LessThanOrEqual("_nats_seq", replay.up_to),
        )
        properties = self._summary(self.position, commit_metadata)
        rows, dead = replay.rows, replay.dead_letters
        dead_count = 0
        try:
            if dead is not None and (self._dead is not None or dead.num_rows):
                dead = storable(dead, None)
                dead_props = self._summary(self._dead_version or 0, commit_metadata)
                if self._dead is None:
                    self._dead = self._create(self.dead_identifier, dead, dead_props)
                else:
                    with quiet_overwrites(), self._dead.transaction() as txn:
                        evolve(txn, self._dead, dead)
                        txn.overwrite(dead, window, snapshot_properties=dead_props)
                dead_count = dead.num_rows
            if self._table is None and (rows is None or rows.num_rows == 0):
                return CommitResult(0, dead_count, None, self.position)
            if self._table is None:
                assert rows is not None
                source = storable(rows, None)
                if self._required and source.num_rows:
                    source = latest_per_key(source, self.primary_key)
                self._table = self._create(self.identifier, source, properties)
                return CommitResult(source.num_rows, dead_count, self.table_version, self.position)
            source = storable(rows, self.schema()) if rows is not None else self._empty_rows()
            with quiet_overwrites(), self._table.transaction() as txn:
                evolve(txn, self._table, source)
                if self.strategy == "merge":
                    self._merge(txn, source, properties, replace_equal=True)
                else:
                    txn.overwrite(source, window, snapshot_properties=properties)
        except CommitFailedException as exc:
            raise self._conflict(exc) from None
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "replace the window of") from None
        return CommitResult(source.num_rows, dead_count, self.table_version, self.position)

    def close(self) -> None:
        """Release the catalog's connections (the sink may be opened again)."""
        engine = getattr(self._catalog, "engine", None)
        if engine is not None:
            engine.dispose()
        self._catalog = None
        self._opened = False

    # -- internals -----------------------------------------------------------------------------

    def _load(self, ident: tuple[str, str]) -> Table | None:
        assert self._catalog is not None
        try:
            table = cat.load_table(self._catalog, ident)
        except Exception as exc:
            raise SinkError(
                f"cannot load Iceberg table {'.'.join(ident)}: {cat.error_text(exc)}. Check "
                "the depot's catalog and storage options (credentials, region, endpoint)"
            ) from None
        if table is not None and missing_properties(table):
            try:
                with table.transaction() as txn:
                    txn.set_properties(cat.REQUIRED_PROPERTIES)
            except CommitFailedException:
                # Another writer committed first; it sets them (or the next open does).
                table = cat.load_table(self._catalog, ident)
        return table

    def _summary(self, last_seq: int, extra: Mapping[str, str] | None) -> dict[str, str]:
        return position_summary(self.app_id, last_seq, self._stream_created, extra)

    def _create(self, ident: tuple[str, str], rows: pa.Table, properties: dict[str, str]) -> Table:
        """Create the table holding ``rows`` and the position, in one catalog commit.

        The catalog inserts the table's row only if there is none, so of two writers creating
        the table at once exactly one succeeds; the other gets :class:`PositionConflict` and
        re-reads the position from the winner's snapshot.
        """
        assert self._catalog is not None
        suffix = ident[1].removeprefix(self.identifier[1])  # the dead-letter table's suffix
        location = self.location.uri.rstrip("/") + suffix
        partition_fields = [] if suffix else self.partition_fields
        try:
            cat.create_table(self._catalog, ident, location, rows, partition_fields, properties)
        except TableAlreadyExistsError:
            self._stale = True
            raise PositionConflict(
                f"another writer created {'.'.join(ident)} since it was opened; open() again "
                "to read the current position"
            ) from None
        table = self._load(ident)
        assert table is not None
        return table

    def _empty_rows(self) -> pa.Table:
        schema = self.schema()
        assert schema is not None
        return schema.empty_table()

    def _merge(
        self, txn: Transaction, rows: pa.Table, properties: dict[str, str], *, replace_equal: bool
    ) -> None:
        """Upsert ``rows`` on the primary key.

        A table row is replaced only by a message with a higher ``_nats_seq`` (or an equal
        one, for a window replay).
        """
        assert self._table is not None
        source, replace_filter = merge_plan(self._table, rows, self.primary_key, replace_equal)
        if replace_filter is not None:
            txn.overwrite(source, replace_filter, snapshot_properties=properties)
        else:
            txn.append(source, snapshot_properties=properties)

    def _write_dead_letters(
        self, dead: pa.Table | None, last_seq: int, properties: Mapping[str, str]
    ) -> int:
        if dead is None or dead.num_rows == 0:
            return 0
        if self._dead_version is not None:
            # Written already by an attempt whose main commit then failed.
            dead = after_position(dead, self._dead_version)
            if dead.num_rows == 0:
                return 0
        dead = storable(dead, None)
        try:
            dead_props = {**properties, LAST_SEQ_KEY: str(last_seq)}
            if self._dead is None:
                self._dead = self._create(self.dead_identifier, dead, dead_props)
            else:
                with quiet_overwrites(), self._dead.transaction() as txn:
                    evolve(txn, self._dead, dead)
                    txn.append(dead, snapshot_properties=dead_props)
        except CommitFailedException as exc:
            raise self._conflict(exc, dead=True) from None
        except _WRITE_ERRORS as exc:
            raise self._error(exc, "commit to", dead=True) from None
        self._dead_version = last_seq
        return dead.num_rows

    def _maintain(self, properties: Mapping[str, str]) -> None:
        if self._table is None:
            return
        expired = maintain_table(
            self._table,
            self._dead,
            ".".join(self.identifier),
            commits=self._commits,
            compact_every=self.compact_every,
            expire_every=self.expire_every,
            keep_snapshots=self.keep_snapshots,
            properties=properties,
        )
        # Expiry may have taken in another writer's commit: if that moved this pipeline's
        # position, re-open.
        if expired and read_position(self._table, self.app_id)[0] != self._version:
            self._stale = True

    def _conflict(self, exc: Exception, dead: bool = False) -> PositionConflict:
        self._stale = True
        ident = self.dead_identifier if dead else self.identifier
        return PositionConflict(
            f"another writer committed to {'.'.join(ident)} since it was opened "
            f"({cat.error_text(exc)}); open() again to read the current position"
        )

    def _error(self, exc: Exception, action: str, dead: bool = False) -> SinkError:
        if isinstance(exc, SinkError):
            return exc
        ident = self.dead_identifier if dead else self.identifier
        return SinkError(
            f"cannot {action} Iceberg table {'.'.join(ident)} at "
            f"{redact((self.dead_letter_location if dead else self.location).uri)}: "
            f"{cat.error_text(exc)}"
        )


__all__ = ["LAST_SEQ_KEY", "PIPELINE_KEY", "IcebergSink"]
