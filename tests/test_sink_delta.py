"""The Delta sink: strategies, position, schema growth, dead letters, concurrency, backfills."""

import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.messages import MessageBatch
from nilus_dagster.redaction import register_secret
from nilus_dagster.sink.decode import decode
from nilus_dagster.sink.delta import (
    STREAM_CREATED_KEY,
    CommitResult,
    DeltaSink,
    PositionConflict,
)
from nilus_dagster.sink.delta_maintenance import (
    COMPACTION_LOCK,
    due,
    maintain_table,
    table_configuration,
)

DAY0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
APP = "pipeline-orders"


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


def sink_at(path: Path, **kwargs: object) -> DeltaSink:
    kwargs.setdefault("app_id", APP)
    sink = DeltaSink(TableLocation(str(path)), **kwargs)  # type: ignore[arg-type]
    sink.open()
    return sink


def write(sink: DeltaSink, b: MessageBatch, **kwargs: object) -> CommitResult:
    prepared = sink.prepare(b)
    return sink.commit(
        prepared.rows,
        prepared.dead_letters,
        last_seq=b.last_seq,
        **kwargs,  # type: ignore[arg-type]
    )


def turn(path: Path, every: int) -> int:
    """A version that is the table's turn for work done every ``every`` versions."""
    return next(v for v in range(1, every + 1) if due(TableLocation(str(path)), v, every))


def six_small_files(path: Path) -> None:
    """A table of six one-row commits, never compacted."""
    sink = sink_at(path, compact_every=0)
    for i in range(6):
        write(sink, batch([{"id": i}], start=i + 1))


def compact_at_its_turn(table: DeltaTable, path: Path) -> None:
    """Run maintenance through ``table`` as after a commit on the table's compaction turn."""
    location = TableLocation(str(path))
    args = {"compact_every": 10, "checkpoint_every": 0, "metadata": {}}
    maintain_table(table, location, version=turn(path, 10), **args)  # type: ignore[arg-type]


def table_rows(path: Path) -> list[dict]:
    rows = DeltaTable(str(path)).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: r["_nats_seq"])


def test_a_missing_table_opens_empty_and_is_created_by_the_first_commit(tmp_path: Path) -> None:
    path = tmp_path / "analytics" / "orders"
    sink = DeltaSink(TableLocation(str(path)), app_id=APP)
    state = sink.open()
    assert (state.exists, state.position, state.stream_created, state.schema) == (
        False,
        0,
        None,
        None,
    )
    assert sink.row_count() == 0 and sink.newest_timestamp() is None
    result = write(sink, batch([{"id": 1}, {"id": 2}], start=1))
    assert result == CommitResult(2, 0, 1, 2)  # version 0 creates it empty, 1 holds the rows
    assert [r["id"] for r in table_rows(path)] == [1, 2]
    assert DeltaTable(str(path)).transaction_version(APP) == 2


def test_create_table_false_and_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "analytics" / "orders"
    sink = DeltaSink(TableLocation(str(path)), app_id=APP, create_table=False)
    with pytest.raises(SinkError) as info:
        sink.open()
    assert str(path) in str(info.value)
    assert "create_table" in str(info.value)


def test_append_and_position_round_trip(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "t")
    write(sink, batch([{"id": i} for i in range(3)], start=1), commit_metadata={"k": "v"})
    write(
        sink,
        batch([{"id": i} for i in range(3, 5)], start=4),
        commit_metadata={STREAM_CREATED_KEY: "2025-01-01T00:00:00+00:00"},
    )
    assert sink.position == 5
    write(sink, batch([{"id": 5}], start=6))  # no metadata: the creation time is carried on
    again = DeltaSink(TableLocation(str(tmp_path / "t")), app_id=APP)
    state = again.open()
    assert state.exists and state.position == 6
    assert state.stream_created == "2025-01-01T00:00:00+00:00"
    assert state.schema is not None and "id" in state.schema.names
    assert again.row_count() == 6
    assert again.newest_timestamp() == DAY0 + timedelta(seconds=6)
    history = DeltaTable(str(tmp_path / "t")).history(1)[0]
    assert history[STREAM_CREATED_KEY] == "2025-01-01T00:00:00+00:00"
    other_app = DeltaSink(TableLocation(str(tmp_path / "t")), app_id="another")
    assert other_app.open().position == 0


def test_commit_refuses_a_sequence_not_past_the_position(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "t")
    write(sink, batch([{"id": 1}, {"id": 2}], start=1))
    with pytest.raises(SinkError, match="refusing to commit up to sequence 2"):
        write(sink, batch([{"id": 2}], start=2))
    assert len(table_rows(tmp_path / "t")) == 2


def test_rows_at_or_below_the_position_are_never_written_again(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "t")
    write(sink, batch([{"id": 1}, {"id": 2}], start=1))
    result = write(sink, batch([{"id": 2}, {"id": 3}], start=2))
    assert result.rows_written == 1
    assert [r["_nats_seq"] for r in table_rows(tmp_path / "t")] == [1, 2, 3]


def test_empty_commit_moves_the_position(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "t")
    write(sink, batch([{"id": 1}], start=1))
    empty = decode(MessageBatch()).rows
    result = sink.commit(empty, None, last_seq=10)
    assert result.rows_written == 0 and result.position == 10
    assert DeltaSink(TableLocation(str(tmp_path / "t")), app_id=APP).open().position == 10
    # a brand-new table whose first messages were all poison still records the position
    fresh = sink_at(tmp_path / "fresh")
    result = write(fresh, batch([b"bad", b"[]"], start=1))
    assert (result.rows_written, result.dead_letters, result.position) == (0, 2, 2)
    assert DeltaSink(TableLocation(str(tmp_path / "fresh")), app_id=APP).open().position == 2


def test_merge_keeps_the_latest_sequence_per_key(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path, strategy="merge", primary_key=["id"])
    write(
        sink,
        batch(
            [
                {"id": 1, "v": "a1"},
                {"id": 2, "v": "b1"},
                {"id": 1, "v": "a2"},  # in-batch: the latest sequence wins
                {"id": 4, "v": "d1"},
                {"id": 4, "v": "d2"},
            ],
            start=1,
        ),
    )
    assert {(r["id"], r["v"]) for r in table_rows(path)} == {(1, "a2"), (2, "b1"), (4, "d2")}
    write(sink, batch([{"id": 2, "v": "b2"}, {"id": 3, "v": "c1"}], start=6))
    rows = {r["id"]: (r["v"], r["_nats_seq"]) for r in table_rows(path)}
    assert rows == {1: ("a2", 3), 2: ("b2", 6), 3: ("c1", 7), 4: ("d2", 5)}
    # An older message for key 1 (another writer replaying sequence 2) never rolls it back.
    replay = sink_at(path, app_id="replayer", strategy="merge", primary_key=["id"])
    write(replay, batch([{"id": 1, "v": "stale"}], start=2))
    assert {r["id"]: r["v"] for r in table_rows(path)}[1] == "a2"
    assert len(table_rows(path)) == 4


def test_merge_rows_without_a_key_are_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path, strategy="merge", primary_key=["id"])
    # a first batch with no key at all creates the table without the key column ...
    result = write(sink, batch([{"v": "no key"}, {"id": None, "v": "null key"}], start=1))
    assert (result.rows_written, result.dead_letters, result.position) == (0, 2, 2)
    # ... and the next batches still merge on it
    write(sink, batch([{"id": 1, "v": "a1"}, {"v": "keyless"}], start=3))
    write(sink, batch([{"id": 1, "v": "a2"}], start=5))
    assert [(r["id"], r["v"]) for r in table_rows(path)] == [(1, "a2")]
    dead = DeltaTable(str(path) + "__dead_letters").to_pyarrow_table().to_pylist()
    assert sorted(d["_nats_seq"] for d in dead) == [1, 2, 4]
    assert all("primary key field 'id' is missing or null" in d["error"] for d in dead)


def test_merge_that_changes_nothing_still_moves_the_position(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write(
        sink_at(path, app_id="first", strategy="merge", primary_key=["id"]),
        batch([{"id": 1, "v": "new"}], start=50),
    )
    sink = sink_at(path, strategy="merge", primary_key=["id"])
    result = write(sink, batch([{"id": 1, "v": "old"}], start=10))
    assert result.position == 10
    assert DeltaSink(TableLocation(str(path)), app_id=APP).open().position == 10
    assert [r["v"] for r in table_rows(path)] == ["new"]


def test_merge_without_a_primary_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="primary_key"):
        DeltaSink(TableLocation(str(tmp_path / "t")), app_id=APP, strategy="merge")


def test_replace_overwrites_on_the_first_commit_of_a_run_then_appends(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write(sink_at(path, strategy="replace"), batch([{"id": i} for i in range(5)], start=1))
    run = sink_at(path, strategy="replace")
    write(run, batch([{"id": 10}], start=6), overwrite=True)
    write(run, batch([{"id": 11}], start=7))
    assert [r["id"] for r in table_rows(path)] == [10, 11]
    assert run.position == 7


def test_schema_grows_with_new_fields(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path)
    write(sink, batch([{"id": 1, "o": {"a": 1}}], start=1))
    write(sink, batch([{"id": 2, "extra": "x", "o": {"a": 2, "b": "new"}}], start=2))
    write(sink, batch([{"id": 3}], start=3))  # fields missing from a batch are nulls
    rows = table_rows(path)
    assert [(r["id"], r["extra"]) for r in rows] == [(1, None), (2, "x"), (3, None)]
    assert [r["o"] for r in rows] == [{"a": 1, "b": None}, {"a": 2, "b": "new"}, None]


def test_fields_that_were_only_null_or_empty_take_their_first_real_type(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path)
    write(sink, batch([{"id": 1, "tags": [], "note": None, "o": {"x": None}}], start=1))
    write(sink, batch([{"id": 2, "tags": ["a"], "note": "n", "o": {"x": 5}}], start=2))
    write(sink, batch([{"id": 3, "tags": ["b", "c"], "note": "m", "o": {"x": 6}}], start=3))
    rows = table_rows(path)
    assert [(r["tags"], r["note"], r["o"]) for r in rows] == [
        # "x" was only ever null when the table was made: left out rather than stored as a
        # void member, which a later object in "x" would turn into an unreadable log.
        ([], None, None),
        (["a"], "n", {"x": 5}),
        (["b", "c"], "m", {"x": 6}),
    ]
    assert not (tmp_path / "t__dead_letters").exists()  # nothing was a conflict


def test_castable_types_are_cast_to_the_table_type(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path)
    write(sink, batch([{"price": 1.5, "qty": 1, "tags": ["a"]}], start=1))
    # price arrives integral (int64) and qty integral-valued floats: both fit
    write(sink, batch([{"price": 2, "qty": 2.0, "tags": []}, {"price": None}], start=2))
    rows = table_rows(path)
    assert [r["price"] for r in rows] == [1.5, 2.0, None]
    assert [r["qty"] for r in rows] == [1, 2, None]
    schema = DeltaTable(str(path)).schema().to_arrow()
    assert pa.schema(schema).field("price").type == pa.float64()
    assert pa.schema(schema).field("qty").type == pa.int64()


def test_values_that_conflict_with_the_table_type_become_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path)
    write(sink, batch([{"id": 1, "qty": 1, "o": {"a": 1}}], start=1))
    b = batch(
        [
            {"id": 2, "qty": "two"},  # first in its batch: the table's type still decides
            {"id": 3, "qty": 3.5},
            {"id": 4, "qty": 4, "o": {"a": "text"}},
            {"id": 5, "QTY": 5},
            {"id": 6, "qty": 6},
            {"id": 7},
        ],
        start=2,
    )
    prepared = sink.prepare(b)
    assert prepared.rows.column("id").to_pylist() == [6, 7]
    by_seq = {d["_nats_seq"]: d for d in prepared.dead_letters.to_pylist()}
    assert set(by_seq) == {2, 3, 4, 5}
    assert "'qty' is string in this message but column 'qty' is int64" in by_seq[2]["error"]
    assert "'qty' value does not fit double" in by_seq[3]["error"]
    assert "int64 in the table" in by_seq[3]["error"]
    assert "'o' is struct<a: string> in this message" in by_seq[4]["error"]
    assert "letter case" in by_seq[5]["error"]
    assert all(by_seq[s]["_nats_data"] == b.payloads[s - 2] for s in by_seq)  # exact bytes
    result = sink.commit(prepared.rows, prepared.dead_letters, last_seq=b.last_seq)
    assert (result.rows_written, result.dead_letters) == (2, 4)
    dead = DeltaTable(str(path) + "__dead_letters").to_pyarrow_table().to_pylist()
    assert sorted(d["_nats_seq"] for d in dead) == [2, 3, 4, 5]
    assert [r["id"] for r in table_rows(path)] == [1, 6, 7]


def test_conform_alone_names_column_and_types(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "t")
    write(sink, batch([{"id": 1, "qty": 1}], start=1))
    rows, dead = sink.conform(decode(batch([{"id": 7, "qty": "x"}, {"id": 8}], start=2)).rows)
    assert rows.column("id").to_pylist() == [8]
    letter = dead.to_pylist()[0]
    assert letter["error"] == (
        "field 'qty' is string in this message but column 'qty' is int64 in the table"
    )
    # without the raw payloads at hand, the dead letter holds the row as JSON
    assert json.loads(letter["_nats_data"]) == {"id": 7, "qty": "x"}


@pytest.mark.parametrize("strategy", ["append", "merge", "replace"])
@pytest.mark.parametrize("poison", [False, True], ids=["rows", "rows+dead-letters"])
def test_two_sinks_on_one_snapshot_the_second_commit_conflicts(
    tmp_path: Path, strategy: str, poison: bool
) -> None:
    path = tmp_path / "t"
    key = {"primary_key": ["id"]} if strategy == "merge" else {}
    write(sink_at(path, strategy=strategy, **key), batch([{"id": 0}], start=1))
    first, second = (sink_at(path, strategy=strategy, **key) for _ in range(2))
    b = batch([{"id": 1}, {"id": 2}, b"poison" if poison else {"id": 3}], start=2)
    write(first, b)
    with pytest.raises(PositionConflict):
        write(second, b)
    with pytest.raises(PositionConflict):  # stays refused until re-opened
        write(second, batch([{"id": 9}], start=5))
    assert [r["_nats_seq"] for r in table_rows(path)] == [1, 2, 3] + ([] if poison else [4])
    if poison:
        dead = DeltaTable(str(path) + "__dead_letters").to_pyarrow_table()
        assert dead.column("_nats_seq").to_pylist() == [4]
    assert second.open().position == 4
    write(second, batch([{"id": 9}], start=5))
    assert DeltaTable(str(path)).transaction_version(APP) == 5


def test_two_replace_runs_overwriting_at_once_conflict(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write(sink_at(path, strategy="replace"), batch([{"id": 0}], start=1))
    first, second = (sink_at(path, strategy="replace") for _ in range(2))
    write(first, batch([{"id": 1}], start=2), overwrite=True)
    with pytest.raises(PositionConflict):
        write(second, batch([{"id": 1}], start=2), overwrite=True)
    assert [r["_nats_seq"] for r in table_rows(path)] == [2]


def test_concurrent_creation_of_a_new_table_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "t"
    first, second = sink_at(path), sink_at(path)
    write(first, batch([{"id": 1}], start=1))
    with pytest.raises(PositionConflict):
        write(second, batch([{"id": 1}], start=1))
    assert len(table_rows(path)) == 1


def test_dead_letters_are_written_once_across_a_retry(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write(sink_at(path), batch([{"id": 0}], start=1))
    retried, other = sink_at(path), sink_at(path)
    # The other writer commits rows 2..4 (no dead letters of its own reach the table) ...
    other.commit(decode(batch([{"id": 1}, {"id": 2}, {"id": 3}], start=2)).rows, None, last_seq=4)
    # ... so this attempt writes its dead letters, then its main commit conflicts.
    b = batch([{"id": 1}, b"bad-3", b"bad-4"], start=2)
    with pytest.raises(PositionConflict):
        write(retried, b)
    assert retried.open().position == 4
    # The retry covers more messages; dead letters at or below the dead-letter table's
    # position are not written again.
    result = write(retried, batch([{"id": 1}, b"bad-3", b"bad-4", b"bad-5"], start=2))
    assert result.dead_letters == 1
    dead = DeltaTable(str(path) + "__dead_letters").to_pyarrow_table()
    assert sorted(dead.column("_nats_seq").to_pylist()) == [3, 4, 5]


def _window_batch(start: int, day: int, ids: list[int], tag: str) -> MessageBatch:
    times = [DAY0 + timedelta(days=day, hours=i) for i in range(len(ids))]
    return batch([{"id": i, "tag": tag} for i in ids], start=start, times=times)


@pytest.mark.parametrize("strategy", ["append", "merge"])
def test_replace_window_is_idempotent_and_leaves_other_windows(
    tmp_path: Path, strategy: str
) -> None:
    path = tmp_path / "t"
    key = {"primary_key": ["id"]} if strategy == "merge" else {}
    sink = sink_at(path, strategy=strategy, **key)
    write(sink, _window_batch(1, 0, [1, 2], "day0"))
    write(sink, _window_batch(3, 1, [3, 4, 5], "day1"))
    write(sink, _window_batch(6, 2, [6], "day2"))
    before = table_rows(path)
    version_position = sink.position
    # the replay of day 1 (sequences 3..5) with a message that is not in the window
    replay = decode(_window_batch(3, 1, [3, 4, 5], "day1")).rows
    stray = decode(_window_batch(6, 2, [6], "stray")).rows  # outside the window
    ahead = decode(_window_batch(7, 1, [7], "ahead")).rows  # past the position
    start, end = DAY0 + timedelta(days=1), DAY0 + timedelta(days=2)
    for _ in range(2):
        rows, _dead = sink.conform(pa.concat_tables([replay, stray, ahead]))
        result = sink.replace_window(rows, None, start=start, end=end)
        assert result.rows_written == 3 and result.position == version_position
        assert table_rows(path) == before
    assert DeltaSink(TableLocation(str(path)), app_id=APP).open().position == version_position
    # a corrected replay of the window replaces exactly that window
    fixed = decode(_window_batch(3, 1, [3, 4], "fixed")).rows
    sink.replace_window(sink.conform(fixed)[0], None, start=start, end=end)
    tags = {r["id"]: r["tag"] for r in table_rows(path)}
    if strategy == "append":
        assert tags == {1: "day0", 2: "day0", 3: "fixed", 4: "fixed", 6: "day2"}
    else:  # merge tables merge the window's rows in (equal sequence wins, nothing deleted)
        assert tags == {1: "day0", 2: "day0", 3: "fixed", 4: "fixed", 5: "day1", 6: "day2"}


def test_replace_window_replaces_dead_letters_of_the_window(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path)
    times = [DAY0 + timedelta(hours=1), DAY0 + timedelta(hours=2), DAY0 + timedelta(days=3)]
    b = batch([{"id": 1}, b"bad", b"bad later"], start=1, times=times)
    write(sink, b)
    decoded = decode(batch([{"id": 1}, b"bad"], start=1, times=times[:2]))
    for _ in range(2):
        result = sink.replace_window(
            decoded.rows, decoded.dead_letters, start=DAY0, end=DAY0 + timedelta(days=1)
        )
        assert result.dead_letters == 1
    dead = DeltaTable(str(path) + "__dead_letters").to_pyarrow_table()
    assert sorted(dead.column("_nats_seq").to_pylist()) == [2, 3]


def test_checkpoints_and_compaction_keep_the_position(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = sink_at(path, checkpoint_every=4, compact_every=6)
    for i in range(12):
        write(sink, batch([{"id": i}], start=i + 1))
    log = sorted(p.name for p in (path / "_delta_log").iterdir())
    assert any(name.endswith(".checkpoint.parquet") for name in log)
    table = DeltaTable(str(path))
    assert len(table.file_uris()) < 12  # compacted
    assert table.transaction_version(APP) == 12
    assert [r["id"] for r in table_rows(path)] == list(range(12))
    reopened = sink_at(path)
    assert reopened.position == 12
    write(reopened, batch([{"id": 12}], start=13))
    assert reopened.row_count() == 13


def test_local_tables_checkpoint_every_100_versions_and_object_stores_every_10() -> None:
    local = DeltaSink(TableLocation("/data/orders"), app_id=APP)
    remote = DeltaSink(TableLocation("s3://bucket/analytics/orders"), app_id=APP)
    assert (local.checkpoint_every, remote.checkpoint_every) == (100, 10)
    chosen = DeltaSink(TableLocation("s3://bucket/orders"), app_id=APP, checkpoint_every=0)
    assert chosen.checkpoint_every == 0


def test_checkpoint_every_0_still_checkpoints_direct_appends_at_deltas_interval(
    tmp_path: Path,
) -> None:
    # Direct appends bypass deltalake, whose own checkpoints follow only its own commits.
    path = tmp_path / "t"
    rows = pa.table({"id": pa.array([0], pa.int64())})
    write_deltalake(str(path), rows, configuration={"delta.checkpointInterval": "5"})
    sink = sink_at(path, checkpoint_every=0, compact_every=0)
    for i in range(1, 13):
        write(sink, batch([{"id": i}], start=i))
    checkpoints = [p for p in (path / "_delta_log").iterdir() if ".checkpoint." in p.name]
    assert len(checkpoints) >= 2
    assert DeltaTable(str(path)).transaction_version(APP) == 12


def test_compaction_counts_table_versions_so_runs_of_one_commit_compact_too(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t"
    for i in range(25):  # 25 per-tick runs of one commit each: 25 writers
        write(sink_at(path, compact_every=10), batch([{"id": i}], start=i + 1))
    table = DeltaTable(str(path))
    assert len(table.file_uris()) < 10
    assert table.transaction_version(APP) == 25
    assert [r["id"] for r in table_rows(path)] == list(range(25))


def test_writers_sharing_a_table_take_turns_to_compact(tmp_path: Path) -> None:
    # deltalake 1.6.6 lets two compactions of the same files both commit, doubling the rows;
    # only the writer of the version that is the table's turn compacts, however stale its
    # snapshot.
    path = tmp_path / "t"
    write(sink_at(path), batch([{"id": 0}], start=1))  # versions 0 (create) and 1
    late = sink_at(path, compact_every=5)
    other = sink_at(path, app_id="other", compact_every=5)
    compacts_at = next(v for v in range(2, 7) if due(TableLocation(str(path)), v, 5))
    for i in range(1, compacts_at):  # versions 2.. up to the turn; the compaction is next
        write(other, batch([{"id": i}], start=100 + i))
    write(late, batch([{"id": 9}], start=2))  # opened at version 1: a stale ``before``
    operations = [entry["operation"] for entry in DeltaTable(str(path)).history()]
    assert operations.count("OPTIMIZE") == 1
    assert sorted(r["id"] for r in table_rows(path)) == [0, *range(1, compacts_at), 9]


@pytest.mark.parametrize("lock_age", [None, 5.0, 3600.0], ids=["none", "held", "stale"])
def test_a_compaction_in_progress_makes_the_next_one_wait_its_turn(
    tmp_path: Path, lock_age: float | None
) -> None:
    path = tmp_path / "t"
    six_small_files(path)
    lock = path / COMPACTION_LOCK
    if lock_age is not None:  # another writer compacting (or killed while it did)
        lock.touch()
        os.utime(lock, (time.time() - lock_age, time.time() - lock_age))
    compact_at_its_turn(DeltaTable(str(path)), path)
    compacted = [e["operation"] for e in DeltaTable(str(path)).history()].count("OPTIMIZE")
    assert compacted == (0 if lock_age == 5.0 else 1)
    assert lock.exists() == (lock_age == 5.0)  # a lock it took is released
    assert [r["id"] for r in table_rows(path)] == list(range(6))


def test_a_compaction_from_a_stale_snapshot_reads_the_table_again_first(tmp_path: Path) -> None:
    # deltalake 1.6.6 lets two compactions of the same files both commit (every compacted row
    # twice); the second one, taken from the same snapshot, must see the first's result.
    path = tmp_path / "t"
    six_small_files(path)
    first, second = DeltaTable(str(path)), DeltaTable(str(path))
    for table in (first, second):
        compact_at_its_turn(table, path)
    assert [r["id"] for r in table_rows(path)] == list(range(6))


def test_a_local_table_is_vacuumed_of_files_past_their_retention(tmp_path: Path) -> None:
    path = tmp_path / "t"
    six_small_files(path)
    table = DeltaTable(str(path))
    table.optimize.compact()
    # Set on the table (the sink's own floor is an hour), and kept: the manifest sets none.
    table.alter.set_table_properties({"delta.deletedFileRetentionDuration": "interval 1 seconds"})
    (path / "part-orphan-of-a-killed-run.parquet").write_bytes(b"PAR1")
    time.sleep(1.2)
    args = {"compact_every": 0, "checkpoint_every": 0, "metadata": {}}
    vacuums_at = turn(path, 1000)
    maintain_table(table, TableLocation(str(path)), version=vacuums_at - 1, **args)
    assert len(list(path.glob("*.parquet"))) == 8  # nothing due yet
    maintain_table(table, TableLocation(str(path)), version=vacuums_at, **args)
    on_disk = sorted(p.name for p in path.glob("*.parquet"))
    assert on_disk == sorted(Path(uri).name for uri in DeltaTable(str(path)).file_uris())
    assert [r["id"] for r in table_rows(path)] == list(range(6))


def test_a_local_table_keeps_15_minutes_of_log_and_cleans_older_entries(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write(sink_at(path), batch([{"id": 0}], start=1))
    retention = DeltaTable(str(path)).metadata().configuration
    assert retention["delta.logRetentionDuration"] == "interval 900 seconds"

    short = tmp_path / "short"
    sink = sink_at(short, log_retention_hours=1 / 3600, checkpoint_every=10)
    for i in range(100):
        write(sink, batch([{"id": i}], start=i + 1))
    time.sleep(1.5)  # these entries and their checkpoints are now past the retention
    for i in range(100, 200):  # the log cleanup's turn comes among these
        write(sink, batch([{"id": i}], start=i + 1))
    entries = [p for p in (short / "_delta_log").iterdir() if p.suffix == ".json"]
    assert len(entries) < 120
    reopened = sink_at(short)
    assert reopened.position == 200
    assert reopened.row_count() == 200


def test_a_table_from_before_gets_the_log_retention_at_the_first_commit(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write(sink_at(path), batch([{"id": 0}], start=1))
    DeltaTable(str(path)).alter.set_table_properties(
        {"delta.logRetentionDuration": "interval 30 days"}
    )
    old = tmp_path / "old"  # as tables were created before the sink set a retention
    write_deltalake(str(old), pa.table({"id": pa.array([], pa.int64())}), mode="ignore")
    assert "delta.logRetentionDuration" not in DeltaTable(str(old)).metadata().configuration

    sink = sink_at(old)
    for i in range(3):
        write(sink, batch([{"id": i}], start=i + 1))
    table = DeltaTable(str(old))
    assert table.metadata().configuration["delta.logRetentionDuration"] == "interval 900 seconds"
    files = table.metadata().configuration["delta.deletedFileRetentionDuration"]
    assert files == "interval 3600 seconds"
    assert table.transaction_version(APP) == 3
    assert sink_at(old).position == 3

    # A retention set on the table is kept, unless the manifest asks for another.
    write(sink_at(path), batch([{"id": 1}], start=2))
    kept = DeltaTable(str(path)).metadata().configuration["delta.logRetentionDuration"]
    assert kept == "interval 30 days"
    write(sink_at(path, log_retention_hours=2), batch([{"id": 2}], start=3))
    changed = DeltaTable(str(path)).metadata().configuration["delta.logRetentionDuration"]
    assert changed == "interval 7200 seconds"
    assert [r["id"] for r in table_rows(path)] == [0, 1, 2]


def test_setting_the_retention_never_lets_another_writers_rows_through_twice(
    tmp_path: Path,
) -> None:
    old = tmp_path / "old"
    write_deltalake(str(old), pa.table({"id": pa.array([], pa.int64())}), mode="ignore")
    mine, theirs = sink_at(old), sink_at(old)
    write(theirs, batch([{"id": 1}], start=1))
    with pytest.raises(PositionConflict):
        write(mine, batch([{"id": 1}], start=1))
    write(sink_at(old), batch([{"id": 2}], start=2))
    assert [r["_nats_seq"] for r in table_rows(old)] == [1, 2]


def test_object_store_tables_keep_deltas_default_log_retention() -> None:
    s3 = TableLocation("s3://bucket/analytics/orders")
    assert table_configuration(s3, None) is None
    assert table_configuration(s3, 48) == {
        "delta.logRetentionDuration": "interval 172800 seconds",
        "delta.deletedFileRetentionDuration": "interval 172800 seconds",
    }
    local = TableLocation("file:///data/orders")
    assert table_configuration(local, None) == {
        "delta.logRetentionDuration": "interval 900 seconds",
        "delta.deletedFileRetentionDuration": "interval 3600 seconds",  # at least an hour
    }


def test_maintenance_that_picks_up_another_writer_makes_the_next_commit_conflict(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t"
    write(sink_at(path), batch([{"id": 0}], start=1))
    mine = sink_at(path, compact_every=1)
    theirs = sink_at(path)
    write(theirs, batch([{"id": 1}], start=2))
    with pytest.raises(PositionConflict):
        write(mine, batch([{"id": 1}], start=2))
    assert [r["_nats_seq"] for r in table_rows(path)] == [1, 2]


def test_storage_options_reach_deltalake(tmp_path: Path) -> None:
    bad = {"max_retries": "not-a-number"}
    fresh = DeltaSink(TableLocation(f"file://{tmp_path}/t", bad), app_id=APP)
    fresh.open()  # nothing to read yet
    with pytest.raises(SinkError, match="max_retries"):
        write(fresh, batch([{"id": 1}], start=1))  # the create write used the options
    write(sink_at(tmp_path / "t"), batch([{"id": 1}], start=1))
    with pytest.raises(SinkError, match="max_retries"):
        DeltaSink(TableLocation(f"file://{tmp_path}/t", bad), app_id=APP).open()
    good = DeltaSink(TableLocation(f"file://{tmp_path}/t", {"max_retries": "1"}), app_id=APP)
    assert good.open().position == 1
    secret = "s3cr3t-access-key-value"
    register_secret(secret)
    s3 = TableLocation(
        "s3://bucket/analytics/orders",
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "key-id",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1",
            "max_retries": "0",
            "retry_timeout": "1s",
        },
    )
    with pytest.raises(SinkError) as info:
        DeltaSink(s3, app_id=APP).open()
    assert "127.0.0.1:9" in str(info.value)  # the endpoint option was used
    assert secret not in str(info.value)


@pytest.mark.parametrize("strategy", ["append", "merge"])
def test_concurrent_first_commits_to_a_new_table_write_once(tmp_path: Path, strategy: str) -> None:
    # Two writers creating a table at once both succeed in deltalake (the second create is
    # rebased without the txn check), so the sink creates tables empty and writes through a
    # checked snapshot.
    key = {"primary_key": ["id"]} if strategy == "merge" else {}
    for trial in range(8):
        path = tmp_path / f"t{trial}"
        sinks = [sink_at(path, strategy=strategy, **key) for _ in range(2)]
        outcomes = _race(
            [lambda s=s: write(s, batch([{"id": 1}, {"id": 2}, b"poison"], start=1)) for s in sinks]
        )
        assert sorted(outcomes) == ["conflict", "ok"]
        assert [r["_nats_seq"] for r in table_rows(path)] == [1, 2]
        dead = DeltaTable(str(path) + "__dead_letters").to_pyarrow_table()
        assert dead.column("_nats_seq").to_pylist() == [3]
        assert DeltaTable(str(path)).transaction_version(APP) == 3


def _race(calls: list) -> list[str]:
    """Run ``calls`` at the same moment in threads; each outcome is 'ok' or 'conflict'."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[str] = []

    def run(call) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        try:
            call()
            outcomes.append("ok")
        except PositionConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes
