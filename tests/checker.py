"""A Jepsen-style queue checker: what was published against what the table holds.

Every fault test ends with :func:`check_exactly_once`: each published sequence must be in the
table or in its dead letters exactly once, nothing else may be there, the content under a
sequence must be what was published under it (when the test says what that was), and the
committed position must equal the last sequence written. Sequences that the stream's retention
removed before they were ingested (a purge, ``max_age``) are expected to be missing, and are
reported apart.
"""

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from deltalake import DeltaTable

from nilus_dagster.manifest.depots import TableLocation

DEAD_LETTER_SUFFIX = "__dead_letters"


def ranges(values: Iterable[int]) -> str:
    """``1..3,7,9..10``: a readable summary of many sequences."""
    out: list[str] = []
    items = sorted(set(values))
    start = prev = None
    for value in [*items, None]:
        if start is not None and (value is None or value != prev + 1):
            out.append(f"{start}..{prev}" if prev != start else f"{start}")
            start = None
        if value is not None and start is None:
            start = value
        prev = value
    return ",".join(out) or "-"


@dataclass
class CheckResult:
    """Lost, duplicated and unexpected sequences, and whether the position matches the data.

    Attributes:
        published: How many sequences were published (retention-lost ones included).
        in_table: Rows in the table (duplicates counted).
        in_dead_letters: Rows in the dead-letter table.
        lost: Published, not removed by retention, and in neither table.
        duplicated: In the table and the dead letters more than once altogether.
        unexpected: Present but never published.
        corrupted: Present, but its key column holds something else than was published under
            that sequence (another stream's message, a shifted row).
        retention_lost: Removed by retention before ingestion, as expected (not an error).
        recovered: Expected to be removed by retention, but ingested anyway (not an error).
        position: The table's committed position (``txn`` version of the app id).
        dead_position: The dead-letter table's ``txn`` version (``None``: no dead letters).
        last_written: The highest sequence in the table and the dead letters.
    """

    published: int
    in_table: int
    in_dead_letters: int
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    unexpected: list[int] = field(default_factory=list)
    corrupted: list[int] = field(default_factory=list)
    retention_lost: list[int] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)
    position: int | None = None
    dead_position: int | None = None
    last_written: int | None = None

    @property
    def position_matches(self) -> bool:
        return self.position == self.last_written

    @property
    def dead_position_ok(self) -> bool:
        """The dead letters' own position never runs ahead of the table's after a full run."""
        if self.dead_position is None:
            return True
        return self.position is not None and self.dead_position <= self.position

    @property
    def ok(self) -> bool:
        return (
            not (self.lost or self.duplicated or self.unexpected or self.corrupted)
            and self.position_matches
            and self.dead_position_ok
        )

    def __str__(self) -> str:
        return (
            f"published={self.published} table={self.in_table} dead={self.in_dead_letters} "
            f"lost=[{ranges(self.lost)}] duplicated=[{ranges(self.duplicated)}] "
            f"unexpected=[{ranges(self.unexpected)}] corrupted=[{ranges(self.corrupted)}] "
            f"retention_lost=[{ranges(self.retention_lost)}] "
            f"recovered=[{ranges(self.recovered)}] position={self.position} "
            f"dead_position={self.dead_position} last_written={self.last_written}"
        )


class _DeltaReader:
    """A Delta table's columns and ``txn`` position (``None`` for a table not created yet)."""

    def __init__(self, uri: str, storage_options: Mapping[str, str] | None = None):
        try:
            options = dict(storage_options or {}) or None
            self.table: DeltaTable | None = DeltaTable(uri, storage_options=options)
        except Exception:  # no table yet: nothing written
            self.table = None

    def columns(self, names: list[str]) -> dict[str, list[object]]:
        if self.table is None:
            return {name: [] for name in names}
        present = set(self.table.schema().to_arrow().names)
        data = self.table.to_pyarrow_table(columns=[n for n in names if n in present])
        return {
            name: data.column(name).to_pylist() if name in present else [None] * data.num_rows
            for name in names
        }

    def position(self, app_id: str) -> int | None:
        return self.table.transaction_version(app_id) if self.table is not None else None


class _PostgresReader:
    """A PostgreSQL table (``postgresql://...?table=schema.table``, as the sink reports it)
    and its row in ``<schema>.nilus_positions``."""

    def __init__(self, uri: str):
        import psycopg

        dsn, _, query = uri.partition("?table=")
        self.schema, _, self.table = query.partition(".")
        self.conn = psycopg.connect(dsn, autocommit=True)

    def _exists(self, table: str) -> bool:
        found = self.conn.execute(
            "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text))", (self.schema, table)
        ).fetchone()
        return found is not None and found[0] is not None

    def columns(self, names: list[str]) -> dict[str, list[object]]:
        if not self._exists(self.table):
            return {name: [] for name in names}
        present = {
            r[0]
            for r in self.conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                (self.schema, self.table),
            )
        }
        select = ", ".join(
            ('"' + n.replace('"', '""') + '"') if n in present else "NULL" for n in names
        )
        name = '"{}"."{}"'.format(self.schema.replace('"', '""'), self.table.replace('"', '""'))
        rows = self.conn.execute(f"SELECT {select} FROM {name}").fetchall()
        return {n: [r[i] for r in rows] for i, n in enumerate(names)}

    def position(self, app_id: str) -> int | None:
        if not self._exists("nilus_positions"):
            return None
        name = '"{}".nilus_positions'.format(self.schema.replace('"', '""'))
        found = self.conn.execute(
            f"SELECT last_seq FROM {name} WHERE pipeline = %s AND table_name = %s",
            (app_id, self.table),
        ).fetchone()
        return int(found[0]) if found else None

    def dead_letters(self) -> "_PostgresReader":
        dead = object.__new__(_PostgresReader)
        dead.schema, dead.table, dead.conn = self.schema, self.table + DEAD_LETTER_SUFFIX, self.conn
        return dead


def _readers(
    table_uri: "str | TableLocation", storage_options: Mapping[str, str] | None = None
) -> tuple[object, object]:
    """The table and its dead letters, read the way their sink wrote them.

    An Iceberg table through its catalog, a PostgreSQL table through the database, a Delta
    table (on an object store with its ``storage_options``).
    """
    if isinstance(table_uri, TableLocation):
        iceberg = _IcebergReader(table_uri)
        return iceberg, iceberg.dead_letters()
    if table_uri.startswith("postgresql://"):
        table = _PostgresReader(table_uri)
        return table, table.dead_letters()
    return (
        _DeltaReader(table_uri, storage_options),
        _DeltaReader(table_uri + DEAD_LETTER_SUFFIX, storage_options),
    )


class _IcebergReader:
    """An Iceberg table read with pyiceberg scans from its catalog (not through the sink under
    test); the position is ``nilus.last_seq`` of the pipeline's newest snapshot in the current
    snapshot's ancestry."""

    def __init__(self, location: TableLocation, suffix: str = ""):
        from pyiceberg.catalog import load_catalog
        from pyiceberg.exceptions import NoSuchTableError

        from nilus_dagster.sink.iceberg_catalog import catalog_name, catalog_properties

        self.location = location
        catalog = load_catalog(catalog_name(location), **catalog_properties(location))
        namespace, name = location.table.split(".")
        try:
            self.table = catalog.load_table((namespace, name + suffix))
        except NoSuchTableError:
            self.table = None
        engine = getattr(catalog, "engine", None)
        if engine is not None:
            engine.dispose()

    def columns(self, names: list[str]) -> dict[str, list[object]]:
        if self.table is None:
            return {name: [] for name in names}
        present = set(self.table.schema().column_names)
        wanted = tuple(n for n in names if n in present)
        data = self.table.scan(selected_fields=wanted).to_arrow()
        return {
            name: data.column(name).to_pylist() if name in present else [None] * data.num_rows
            for name in names
        }

    def position(self, app_id: str) -> int | None:
        from pyiceberg.table.snapshots import ancestors_of

        if self.table is None:
            return None
        for snapshot in ancestors_of(self.table.current_snapshot(), self.table.metadata):
            if snapshot.summary is not None and snapshot.summary["nilus.pipeline"] == app_id:
                return int(snapshot.summary["nilus.last_seq"])
        return None

    def dead_letters(self) -> "_IcebergReader":
        return _IcebergReader(self.location, DEAD_LETTER_SUFFIX)


def order_keys(published: list[int], payloads: list[object]) -> dict[int, object]:
    """``keys=`` for :func:`check_exactly_once`: each JSON payload's ``order_id`` by sequence.

    Poison payloads (bytes) have no key; they are checked through ``expect_dead``.
    """
    return {
        seq: payload["order_id"]
        for seq, payload in zip(published, payloads, strict=True)
        if isinstance(payload, dict)
    }


def check_exactly_once(
    table_uri: "str | TableLocation",
    published: Iterable[int],
    app_id: str,
    *,
    expect_dead: Iterable[int] = (),
    retention_lost: Iterable[int] = (),
    keys: Mapping[int, object] | None = None,
    key_column: str | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> CheckResult:
    """Compare published sequences with the table and its dead letters.

    Every published sequence must be in the table or the dead letters exactly once, nothing
    else may be there, and the committed position must equal the last sequence written.

    Args:
        table_uri: The pipeline's table (its dead letters are ``<uri>__dead_letters``), a
            Delta URI or a ``postgresql://HOST:PORT/DB?table=SCHEMA.TABLE`` location, or an
            Iceberg table's :class:`TableLocation` (read from its catalog).
        published: Every sequence published on the pipeline's subject.
        app_id: The pipeline's transaction app id (PostgreSQL: its ``nilus_positions`` key).
        expect_dead: Sequences that must be dead letters (missing ones count as lost).
        retention_lost: Sequences the stream removed before they could be ingested; missing
            is expected for them.
        keys: What was published under each sequence (``{seq: value of key_column}``): a row
            holding anything else under that sequence is corrupted.
        key_column: The payload field ``keys`` refers to.
        storage_options: ``deltalake`` storage options of a table on an object store
            (``s3://…``).
    """
    published_set = set(published) | set(retention_lost)
    gone = set(retention_lost)
    table, dead_table = _readers(table_uri, storage_options)
    columns = ["_nats_seq", *([key_column] if key_column else [])]
    data = table.columns(columns)  # type: ignore[attr-defined]
    rows = [int(v) for v in data["_nats_seq"]]  # type: ignore[arg-type]
    dead = [int(v) for v in dead_table.columns(["_nats_seq"])["_nats_seq"]]  # type: ignore[attr-defined]
    counts = Counter(rows + dead)
    result = CheckResult(
        published=len(published_set), in_table=len(rows), in_dead_letters=len(dead)
    )
    present = set(counts)
    result.lost = sorted(published_set - present - gone)
    result.retention_lost = sorted(gone - present)
    result.recovered = sorted(gone & present)
    result.duplicated = sorted(s for s, n in counts.items() if n > 1)
    result.unexpected = sorted(present - published_set)
    missing_dead = set(expect_dead) - set(dead)
    result.lost = sorted(set(result.lost) | missing_dead)
    if keys is not None and key_column:
        result.corrupted = sorted(
            seq
            for seq, value in zip(rows, data[key_column], strict=True)
            if seq in keys and keys[seq] != value
        )
    result.position = table.position(app_id)  # type: ignore[attr-defined]
    # PostgreSQL commits dead letters with the rows: they have no position of their own.
    if isinstance(dead_table, _DeltaReader):
        result.dead_position = dead_table.position(app_id)
    written = rows + dead
    result.last_written = max(written) if written else None
    return result


def check_orders(
    table_uri: "str | TableLocation",
    published: list[int],
    app_id: str,
    payloads: list[object],
    *,
    storage_options: Mapping[str, str] | None = None,
) -> CheckResult:
    """:func:`check_exactly_once` for order payloads mixed with poison: every ``bytes`` payload
    must be a dead letter, every order a row under its sequence with its ``order_id``."""
    return check_exactly_once(
        table_uri,
        published,
        app_id,
        expect_dead=[s for s, p in zip(published, payloads, strict=True) if isinstance(p, bytes)],
        keys=order_keys(published, payloads),
        key_column="order_id",
        storage_options=storage_options,
    )


def consumer_state(url: str, stream: str, durable: str) -> dict[str, int]:
    """A durable consumer's server-side view: ``ack_floor``, ``delivered``, ``num_pending``,
    ``num_ack_pending`` (stream sequences / counts), read with nats-py directly."""
    import nats

    async def go() -> dict[str, int]:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            info = await nc.jetstream().consumer_info(stream, durable)
        finally:
            await nc.close()
        return {
            "ack_floor": int(info.ack_floor.stream_seq if info.ack_floor else 0),
            "delivered": int(info.delivered.stream_seq if info.delivered else 0),
            "num_pending": int(info.num_pending or 0),
            "num_ack_pending": int(info.num_ack_pending or 0),
        }

    return asyncio.run(go())
