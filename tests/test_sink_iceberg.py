"""The Iceberg sink: position in snapshot summaries, strategies, schema growth, dead letters,
conflicts, backfill windows, partitioning and maintenance, on SQLite and PostgreSQL catalogs."""

import json
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.iceberg import IcebergSink
from nilus_dagster.sink.iceberg_catalog import catalog_init_race, connect
from nilus_dagster.sink.writer import STREAM_CREATED_KEY, CommitResult, PositionConflict

DAY0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
APP = "nilus-dagster/orders"


def batch(payloads: list[object], start: int, times: list[datetime] | None = None) -> MessageBatch:
    data = [p if isinstance(p, bytes) else json.dumps(p).encode() for p in payloads]
    n = len(data)
    times = times or [DAY0 + timedelta(seconds=start + i) for i in range(n)]
    return MessageBatch(
        sequences=list(range(start, start + n)),
        timestamps_ns=[int(t.timestamp() * 1_000_000) * 1000 for t in times],
        subjects=["orders.created"] * n,
        payloads=data,
    )


def _locations(root: Path, catalog_uri: str) -> Callable[..., TableLocation]:
    def make(table: str = "analytics.orders") -> TableLocation:
        schema, name = table.split(".")
        return TableLocation(
            str(root / schema / name), kind="iceberg", table=table, catalog={"uri": catalog_uri}
        )

    return make


@pytest.fixture
def location(tmp_path: Path) -> Callable[..., TableLocation]:
    """Iceberg table locations under a fresh local root with an embedded SQLite catalog."""
    return _locations(tmp_path / "root", f"sqlite:///{tmp_path / 'root' / 'catalog.db'}")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_location(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., TableLocation]:
    """As ``location``, and again with the catalog in a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return request.getfixturevalue("location")
    return _locations(tmp_path / "root", request.getfixturevalue("iceberg_pg_catalog_uri"))


def sink_at(location: TableLocation, **kwargs: object) -> IcebergSink:
    kwargs.setdefault("app_id", APP)
    sink = IcebergSink(location, **kwargs)  # type: ignore[arg-type]
    sink.open()
    return sink


def write(sink: IcebergSink, b: MessageBatch, **kwargs: object) -> CommitResult:
    prepared = sink.prepare(b)
    return sink.commit(prepared.rows, prepared.dead_letters, last_seq=b.last_seq, **kwargs)  # type: ignore[arg-type]


def scan(location: TableLocation, suffix: str = "") -> list[dict]:
    """The table's rows, read back with a pyiceberg scan, by sequence."""
    sink = IcebergSink(location, app_id=APP)
    sink.open()
    try:
        table = sink._dead if suffix else sink._table
        rows = table.scan().to_arrow().to_pylist() if table is not None else []
    finally:
        sink.close()
    return sorted(rows, key=lambda r: r["_nats_seq"])


def test_first_commit_creates_table_and_position_round_trips(any_location) -> None:
    loc = any_location()
    sink = IcebergSink(loc, app_id=APP)
    state = sink.open()
    assert (state.exists, state.position, state.stream_created, state.schema) == (
        False,
        0,
        None,
        None,
    )
    assert sink.row_count() == 0 and sink.newest_timestamp() is None
    created = {STREAM_CREATED_KEY: "2025-01-01T00:00:00+00:00", "k": "v"}
    result = write(sink, batch([{"id": 1}, {"id": 2}], start=1), commit_metadata=created)
    assert (result.rows_written, result.dead_letters, result.position) == (2, 0, 2)
    write(sink, batch([{"id": 3}], start=3))  # no metadata: the creation time is carried on
    sink.close()

    again = IcebergSink(loc, app_id=APP)
    state = again.open()
    assert state.exists and state.position == 3
    assert state.stream_created == "2025-01-01T00:00:00+00:00"
    assert again.row_count() == 3
    assert again.newest_timestamp() == DAY0 + timedelta(seconds=3)
    summary = again._table.current_snapshot().summary
    assert (summary["nilus.pipeline"], summary["nilus.last_seq"]) == (APP, "3")
    assert summary[STREAM_CREATED_KEY] == "2025-01-01T00:00:00+00:00"
    assert again._table.location() == loc.uri
    assert again._table.properties["commit.retry.num-retries"] == "0"
    again.close()
    assert sink_at(loc, app_id="another").position == 0
    assert [r["id"] for r in scan(loc)] == [1, 2, 3]


def test_missing_table_with_create_table_false_is_a_clear_error(location) -> None:
    with pytest.raises(SinkError, match="create_table"):
        IcebergSink(location(), app_id=APP, create_table=False).open()


def test_rows_at_or_below_the_position_are_not_written_again(location) -> None:
    loc = location()
    sink = sink_at(loc)
    write(sink, batch([{"id": 1}, {"id": 2}], start=1))
    with pytest.raises(SinkError, match="refusing to commit up to sequence 2"):
        write(sink, batch([{"id": 2}], start=2))
    assert write(sink, batch([{"id": 2}, {"id": 3}], start=2)).rows_written == 1
    empty = sink.commit(None, None, last_seq=10)
    assert (empty.rows_written, empty.position) == (0, 10)
    sink.close()
    assert sink_at(loc).position == 10
    assert [r["_nats_seq"] for r in scan(loc)] == [1, 2, 3]


def test_a_concurrent_commit_is_rejected_and_the_position_re_read(any_location) -> None:
    loc = any_location()
    first = sink_at(loc)
    write(first, batch([{"id": 1}], start=1))
    second = sink_at(loc)
    write(first, batch([{"id": 2}], start=2))
    with pytest.raises(PositionConflict, match="another writer"):
        write(second, batch([{"id": 2}, {"id": 3}], start=2))
    with pytest.raises(PositionConflict):  # stale until opened again
        write(second, batch([{"id": 3}], start=3))
    assert second.open().position == 2
    write(second, batch([{"id": 3}], start=3))
    first.close()
    second.close()
    assert [r["_nats_seq"] for r in scan(loc)] == [1, 2, 3]


def test_two_writers_creating_the_table_at_once_write_the_first_batch_once(any_location) -> None:
    loc = any_location()
    first, second = sink_at(loc), sink_at(loc)
    write(first, batch([{"id": 1}], start=1))
    with pytest.raises(PositionConflict):
        write(second, batch([{"id": 1}], start=1))
    assert second.open().position == 1
    assert [r["_nats_seq"] for r in scan(loc)] == [1]


def test_two_runs_opening_a_new_postgresql_catalog_at_once_both_go_on(
    postgres_database, iceberg_pg_catalog_uri: str, tmp_path: Path
) -> None:
    # Both create the catalog's tables; the loser fails with a unique violation or a duplicate
    # table, by timing, and must open the winner's.
    schemas = [f"race_{i}" for i in range(10)]
    for schema in schemas:
        postgres_database.query(f"CREATE SCHEMA {schema}")
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def open_all() -> None:
        for schema in schemas:
            loc = _locations(
                tmp_path, f"{iceberg_pg_catalog_uri}?options=-csearch_path%3D{schema}"
            )()
            start.wait()
            try:
                catalog = connect(loc)
            except Exception as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
                catalog.engine.dispose()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=open_all) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert outcomes == [None] * 20
    tables = postgres_database.query(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'iceberg_tables'"
    )
    assert tables == [(10,)]


def test_a_duplicate_row_type_is_a_lost_creation_race_too(
    postgres_database, iceberg_pg_catalog_uri: str
) -> None:
    # The rarest timing of that race (seen once in CI): the winner commits between the loser's
    # check for the table's name and for its row type's, so the loser gets duplicate_object.
    # A type left in the way gives PostgreSQL's very error for certain.
    postgres_database.query("CREATE TYPE iceberg_tables AS ENUM ('a')")
    engine = sqlalchemy.create_engine(iceberg_pg_catalog_uri)
    try:
        with pytest.raises(sqlalchemy.exc.DBAPIError) as caught, engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE iceberg_tables (a int)"))
    finally:
        engine.dispose()
    assert 'type "iceberg_tables" already exists' in str(caught.value)
    assert catalog_init_race(caught.value)


def test_new_fields_add_columns_and_a_conflicting_type_is_a_dead_letter(location) -> None:
    loc = location()
    sink = sink_at(loc)
    write(sink, batch([{"id": 1, "amount": 1.5}], start=1))
    result = write(
        sink,
        batch(
            [{"id": 2, "note": "new", "nested": {"a": 1}}, {"id": "x"}, b"not json", {"id": 4}],
            start=2,
        ),
    )
    assert (result.rows_written, result.dead_letters) == (2, 2)
    write(sink, batch([{"id": 6, "nested": {"a": 2, "b": "deeper"}, "tags": []}], start=6))
    sink.close()
    rows = scan(loc)
    assert [(r["_nats_seq"], r["id"], r.get("note")) for r in rows] == [
        (1, 1, None),
        (2, 2, "new"),
        (5, 4, None),
        (6, 6, None),
    ]
    assert rows[-1]["nested"] == {"a": 2, "b": "deeper"}
    dead = scan(loc, suffix="__dead_letters")
    assert [(d["_nats_seq"], d["_nats_data"]) for d in dead] == [
        (3, b'{"id": "x"}'),
        (4, b"not json"),
    ]
    assert "id" in dead[0]["error"]
    reopened = sink_at(loc)
    assert reopened._dead_version == 5


def test_merge_replaces_a_row_only_with_a_higher_sequence(any_location) -> None:
    loc = any_location()
    sink = sink_at(loc, strategy="merge", primary_key=["id"])
    write(sink, batch([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 1, "v": "c"}], start=1))
    write(sink, batch([{"id": 2, "v": "d"}, {"id": 3, "v": "e"}], start=4))
    sink.close()
    assert [(r["id"], r["v"], r["_nats_seq"]) for r in scan(loc)] == [
        (1, "c", 3),
        (2, "d", 4),
        (3, "e", 5),
    ]
    # a replayed window carrying older sequences never rolls a row back
    again = sink_at(loc, strategy="merge", primary_key=["id"])
    prepared = again.prepare(batch([{"id": 2, "v": "old"}], start=2))
    again.replace_window(prepared.rows, None, start=DAY0, end=DAY0 + timedelta(days=1))
    assert again.position == 5
    again.close()
    assert {r["id"]: r["v"] for r in scan(loc)} == {1: "c", 2: "d", 3: "e"}


def test_replace_overwrites_on_the_first_commit_of_a_run(location) -> None:
    loc = location()
    sink = sink_at(loc, strategy="replace")
    write(sink, batch([{"id": 1}, {"id": 2}], start=1), overwrite=True)
    write(sink, batch([{"id": 3}], start=3), overwrite=True)
    write(sink, batch([{"id": 4}], start=4))
    sink.close()
    assert [r["id"] for r in scan(loc)] == [3, 4]
    assert sink_at(loc).position == 4


def test_replace_window_replaces_exactly_that_window_and_keeps_the_position(location) -> None:
    loc = location()
    sink = sink_at(loc)
    times = [DAY0 + timedelta(hours=h) for h in (0, 25, 26, 49)]
    write(sink, batch([{"id": i} for i in range(4)], start=1, times=times))
    window = (DAY0 + timedelta(days=1), DAY0 + timedelta(days=2))
    replay = sink.prepare(batch([{"id": 10}, {"id": 20}], start=2, times=times[1:3]))
    for _ in range(2):  # twice: changes nothing the second time
        result = sink.replace_window(replay.rows, None, start=window[0], end=window[1])
        assert result.rows_written == 2 and result.position == 4
    sink.close()
    assert [(r["_nats_seq"], r["id"]) for r in scan(loc)] == [(1, 0), (2, 10), (3, 20), (4, 3)]
    assert sink_at(loc).position == 4


def test_partition_by_day_of_the_message_time(location) -> None:
    loc = location()
    sink = sink_at(loc, partition_by=["day(_nats_timestamp)"])
    times = [DAY0, DAY0 + timedelta(days=1), DAY0 + timedelta(days=1, hours=1)]
    write(sink, batch([{"id": i} for i in range(3)], start=1, times=times))
    spec = sink._table.spec()
    assert [(f.name, str(f.transform)) for f in spec.fields] == [("_nats_timestamp_day", "day")]
    assert len(list(sink._table.scan().plan_files())) == 2
    with pytest.raises(SinkError, match="partition_by entry"):
        IcebergSink(loc, app_id=APP, partition_by=["weekly(x)"])


def test_maintenance_compacts_small_files_and_bounds_the_snapshots(location) -> None:
    loc = location()
    sink = sink_at(loc, compact_every=5, expire_every=5, keep_snapshots=3)
    for i in range(1, 21):
        write(sink, batch([{"id": i}], start=i))
    table = sink._table
    assert len(list(table.scan().plan_files())) <= 5
    assert len(table.snapshots()) <= 5
    data_files = list((Path(loc.uri) / "data").rglob("*.parquet"))
    assert len(data_files) <= 10
    sink.close()
    assert [r["_nats_seq"] for r in scan(loc)] == list(range(1, 21))
    assert sink_at(loc).position == 20


def test_an_existing_table_gets_the_no_retry_property(location, tmp_path: Path) -> None:
    loc = location()
    sink = sink_at(loc)
    write(sink, batch([{"id": 1}], start=1))
    with sink._table.transaction() as txn:
        txn.set_properties({"commit.retry.num-retries": "4"})
    sink.close()
    assert sink_at(loc)._table.properties["commit.retry.num-retries"] == "0"


def test_remote_root_without_catalog_and_unreachable_catalog_are_clear_errors(
    tmp_path: Path,
) -> None:
    depots = tmp_path / "depots.yaml"
    depots.write_text("depots:\n  lake: {type: iceberg, root: s3://bucket/prefix}\n")
    from nilus_dagster.errors import ManifestError
    from nilus_dagster.manifest.depots import load_depots

    with pytest.raises(ManifestError, match=r"depots.lake.catalog: is required"):
        load_depots(depots)
    bad = TableLocation(
        str(tmp_path / "r" / "a" / "t"),
        kind="iceberg",
        table="a.t",
        catalog={"uri": "postgresql+psycopg2://nobody:s3cret-pw@127.0.0.1:1/none"},
    )
    with pytest.raises(SinkError, match="cannot open the Iceberg catalog") as info:
        IcebergSink(bad, app_id=APP).open()
    assert "s3cret-pw" not in str(info.value)
