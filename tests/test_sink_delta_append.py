"""Direct appends to local Delta tables: what deltalake reads back, conflicts, and fallbacks."""

import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.delta import DeltaSink, PositionConflict
from nilus_dagster.sink.delta_append import (
    AppendConflict,
    append_to_log,
    direct_appends_allowed,
    file_statistics,
    remove_abandoned_entries,
)
from nilus_dagster.sink.delta_maintenance import LOG_CLEANUP_EVERY, VACUUM_EVERY, due

APP = "pipeline-orders"
T0 = datetime(2026, 12, 2, 7, 23, 0, 529_800, tzinfo=timezone.utc)


def orders(start: int, count: int, **extra: object) -> MessageBatch:
    payloads = [
        json.dumps(
            {
                "id": f"ord-{seq:06d}",
                "amount": seq * 1.25,
                "paid": seq % 2 == 0,
                "note": None if seq % 3 else "x" * 40,
                "items": [{"sku": "a", "qty": seq}],
                **extra,
            }
        ).encode()
        for seq in range(start, start + count)
    ]
    stamps = [T0 + timedelta(microseconds=137 * i) for i in range(count)]
    return MessageBatch(
        sequences=list(range(start, start + count)),
        timestamps_ns=[int(t.timestamp() * 1_000_000) * 1000 for t in stamps],
        subjects=["orders.created"] * count,
        payloads=payloads,
    )


def open_sink(path: Path | str, app_id: str = APP, **options: object) -> DeltaSink:
    sink = DeltaSink(TableLocation(str(path)), app_id=app_id, **options)  # type: ignore[arg-type]
    sink.open()
    return sink


def commit(sink: DeltaSink, batch: MessageBatch) -> None:
    prepared = sink.prepare(batch)
    sink.commit(prepared.rows, prepared.dead_letters, last_seq=batch.last_seq)


def writers(path: Path) -> list[str]:
    """The client of each write (creation included) in the table's log, oldest first.

    Maintenance (compaction, at each table's own turn) is left out.
    """
    history = DeltaTable(str(path)).history()
    writes = [e for e in reversed(history) if e.get("operation") in ("WRITE", "CREATE TABLE")]
    return [str(entry.get("clientVersion", "")) for entry in writes]


def sequences(path: Path) -> list[int]:
    rows = DeltaTable(str(path)).to_pyarrow_table(columns=["_nats_seq"])
    return sorted(rows.column("_nats_seq").to_pylist())


def test_appends_bypass_deltalake_and_read_back_as_deltalakes_own(tmp_path: Path) -> None:
    direct, reference = tmp_path / "direct", tmp_path / "reference"
    sink = open_sink(direct)
    commit(sink, orders(1, 5))  # creates the table through deltalake
    commit(sink, orders(6, 20))
    assert writers(direct)[-1].startswith("nilus-dagster-")
    assert writers(direct)[0].startswith("delta-rs")

    prepared = sink.prepare(orders(26, 20))
    write_deltalake(str(reference), prepared.rows, mode="append")
    commit(sink, orders(26, 20))
    ours = DeltaTable(str(direct)).to_pyarrow_table(filters=[("_nats_seq", ">=", 26)])
    theirs = DeltaTable(str(reference)).to_pyarrow_table()
    assert ours.sort_by("_nats_seq").equals(theirs.sort_by("_nats_seq"))

    # The statistics written are the ones deltalake writes (nested columns and long strings
    # are left out: readers then read the file rather than skip it).
    stats = [
        next(
            a
            for a in pa.table(DeltaTable(str(p)).get_add_actions(flatten=True)).to_pylist()
            if a["min._nats_seq"] == 26
        )
        for p in (direct, reference)
    ]
    compared = [
        k
        for k, v in stats[0].items()
        if k.startswith(("min.", "max.", "null_count.")) and v is not None
    ]
    assert {"min._nats_timestamp", "max._nats_seq", "min.id", "null_count.note"} <= set(compared)
    assert {k: stats[0][k] for k in compared} == {k: stats[1][k] for k in compared}
    left_out = {k for k, v in stats[0].items() if v is None and stats[1][k] is not None}
    assert left_out == {"min.note", "max.note"} | {
        k for k in left_out if k.split(".")[1] == "items"
    }
    assert stats[0]["num_records"] == 20
    assert sink.row_count() == 45
    assert sink.newest_timestamp() == theirs.column("_nats_timestamp").to_pylist()[-1].replace(
        microsecond=theirs.column("_nats_timestamp").to_pylist()[-1].microsecond // 1000 * 1000
    )


def test_file_statistics_bound_timestamps_to_the_millisecond_as_deltalake_does() -> None:
    stamps = [T0, T0 + timedelta(microseconds=470_199)]  # .529800 and .999999
    rows = pa.table({"ts": pa.array(stamps, pa.timestamp("us", tz="UTC"))})
    stats = file_statistics(rows)
    assert stats["minValues"] == {"ts": "2026-12-02T07:23:00.529Z"}
    assert stats["maxValues"] == {"ts": "2026-12-02T07:23:00.999Z"}


def test_many_direct_appends_checkpoint_compact_and_skip_files_correctly(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = open_sink(path, compact_every=25, checkpoint_every=10)
    for start in range(1, 301, 5):
        commit(sink, orders(start, 5))
    fresh = DeltaTable(str(path))  # from the newest checkpoint and the entries after it
    assert fresh.transaction_version(APP) == 300
    assert fresh.count() == 300
    assert sequences(path) == list(range(1, 301))
    picked = fresh.to_pyarrow_table(filters=[("_nats_seq", ">", 287)], columns=["_nats_seq"])
    assert sorted(picked.column("_nats_seq").to_pylist()) == list(range(288, 301))
    assert len(fresh.file_uris()) < 30  # compacted along the way
    assert any(p.suffix == ".parquet" for p in (path / "_delta_log").iterdir())


def test_two_writers_on_one_snapshot_the_second_conflicts_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t"
    commit(open_sink(path), orders(1, 3))
    first, second = open_sink(path), open_sink(path)
    commit(first, orders(4, 3))
    data_files = set(path.glob("*.parquet"))
    with pytest.raises(PositionConflict, match="moved the position"):
        commit(second, orders(4, 3))
    with pytest.raises(PositionConflict):  # until re-opened
        commit(second, orders(7, 3))
    assert set(path.glob("*.parquet")) == data_files
    assert second.open().position == 6
    commit(second, orders(7, 3))
    assert sequences(path) == list(range(1, 10))


def test_another_pipelines_commit_in_between_is_no_conflict(tmp_path: Path) -> None:
    path = tmp_path / "t"
    commit(open_sink(path), orders(1, 3))
    ours, theirs = open_sink(path), open_sink(path, app_id="another-pipeline")
    commit(theirs, orders(100, 2))
    commit(ours, orders(4, 3))  # the version after its snapshot is taken: goes to the next
    table = DeltaTable(str(path))
    assert table.transaction_version(APP) == 6
    assert table.transaction_version("another-pipeline") == 101
    assert sequences(path) == [1, 2, 3, 4, 5, 6, 100, 101]


def test_a_commit_of_the_pipelines_position_in_between_makes_the_append_conflict(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t"
    commit(open_sink(path), orders(1, 3))
    service = open_sink(path)
    commit(service, orders(4, 3))
    # Another run of the pipeline commits its position through deltalake.
    write_deltalake(
        str(path),
        DeltaTable(str(path)).to_pyarrow_table(filters=[("_nats_seq", "<=", 3)]).slice(0, 0),
        mode="append",
        commit_properties=CommitProperties(app_transactions=[Transaction(APP, 6)]),
    )
    with pytest.raises(PositionConflict):
        commit(service, orders(7, 3))
    assert service.open().position == 6
    commit(service, orders(7, 3))
    assert sequences(path) == list(range(1, 10))


def test_appends_racing_in_threads_write_every_sequence_once(tmp_path: Path) -> None:
    path = tmp_path / "t"
    commit(open_sink(path), orders(1, 3))  # every column present: no schema change races
    results: dict[str, list[str]] = {}

    def pipeline(app_id: str, offset: int) -> None:
        sink = open_sink(path, app_id=app_id)
        outcomes = results.setdefault(app_id, [])
        for start in range(offset, offset + 200, 4):
            commit(sink, orders(start, 4))
            outcomes.append("ok")

    threads = [
        threading.Thread(target=pipeline, args=(f"app-{i}", 1000 * (i + 1))) for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(results[f"app-{i}"]) == 50 for i in range(3))
    expected = [1, 2, 3] + [
        s for i in range(3) for s in range(1000 * (i + 1), 1000 * (i + 1) + 200)
    ]
    assert sequences(path) == sorted(expected)
    versions = sorted(int(p.stem) for p in (path / "_delta_log").glob("*.json"))
    assert versions == list(range(versions[0], versions[-1] + 1))


def test_a_new_column_goes_through_deltalake_then_appends_go_direct_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t"
    sink = open_sink(path)
    commit(sink, orders(1, 3))
    commit(sink, orders(4, 3))
    commit(sink, orders(7, 3, coupon="WINTER"))  # schema grows: deltalake merges it
    commit(sink, orders(10, 3, coupon="SPRING"))
    kinds = [w.split("-")[0] for w in writers(path)]  # the first: the table's creation
    assert kinds == ["delta", "nilus", "nilus", "delta", "nilus"]
    rows = DeltaTable(str(path)).to_pyarrow_table().sort_by("_nats_seq").to_pylist()
    assert [r["coupon"] for r in rows] == [None] * 6 + ["WINTER"] * 3 + ["SPRING"] * 3
    assert DeltaTable(str(path)).transaction_version(APP) == 12


def test_tables_that_need_more_than_the_direct_path_go_through_deltalake(
    tmp_path: Path,
) -> None:
    constrained, partitioned = tmp_path / "constrained", tmp_path / "partitioned"
    commit(open_sink(constrained), orders(1, 3))
    DeltaTable(str(constrained)).alter.add_constraint({"positive": "amount > 0"})
    commit(open_sink(partitioned, partition_by=["paid"]), orders(1, 3))
    for path in (constrained, partitioned):
        assert not direct_appends_allowed(DeltaTable(str(path)), local=True)
        commit(
            open_sink(path, partition_by=["paid"] if path == partitioned else None), orders(4, 3)
        )
        assert writers(path)[-1].startswith("delta-rs")
    assert not direct_appends_allowed(DeltaTable(str(partitioned)), local=False)


def test_append_to_log_refuses_a_version_whose_commit_changed_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "t"
    rows = pa.table({"_nats_seq": pa.array([1], pa.int64())})
    write_deltalake(str(path), rows)
    wider = rows.append_column("extra", pa.array(["x"]))
    write_deltalake(str(path), wider, mode="append", schema_mode="merge")
    with pytest.raises(AppendConflict, match="schema"):
        append_to_log(path, 0, rows, app_id=APP, txn_version=2, metadata={})
    assert {p.name for p in path.glob("*.parquet")} == {
        a["path"] for a in pa.table(DeltaTable(str(path)).get_add_actions()).to_pylist()
    }


def test_a_window_replay_and_direct_appends_in_between_do_not_conflict(tmp_path: Path) -> None:
    path = tmp_path / "t"
    commit(open_sink(path), orders(1, 6))
    service, replay = open_sink(path), open_sink(path)
    commit(service, orders(7, 3))  # after the replay read the position (6)
    window = (T0 - timedelta(seconds=1), T0 + timedelta(seconds=1))
    prepared = replay.prepare(orders(1, 6, note="replayed"))
    try:
        replay.replace_window(prepared.rows, None, start=window[0], end=window[1], up_to=6)
    except PositionConflict:  # the service's commit was its table's turn to compact
        replay.open()  # as the engine does: the same rows through a fresh snapshot
        replay.replace_window(prepared.rows, None, start=window[0], end=window[1], up_to=6)
    commit(service, orders(10, 3))  # the replay moved no position: no conflict either way
    rows = DeltaTable(str(path)).to_pyarrow_table().sort_by("_nats_seq").to_pylist()
    assert [r["_nats_seq"] for r in rows] == list(range(1, 13))
    assert [r["note"] for r in rows[:6]] == ["replayed"] * 6
    assert DeltaTable(str(path)).transaction_version(APP) == 12


def test_an_append_after_the_log_was_cleaned_past_it_conflicts_and_loses_nothing(
    tmp_path: Path,
) -> None:
    # A quiet pipeline sharing a table with a busy one: the busy one's checkpoints and log
    # cleanup remove the entry the quiet one would append after. A link into that freed
    # version number would succeed and never be read.
    # A table whose maintenance turns miss the quiet writer's versions: its snapshot then
    # stays behind its own appends, as between two turns.
    path = next(
        tmp_path / f"t{i}"
        for i in range(1000)
        if not any(
            due(TableLocation(str(tmp_path / f"t{i}")), v, every)
            for v in (1, 2)
            for every in (10, LOG_CLEANUP_EVERY, VACUUM_EVERY)
        )
    )
    seconds = 1 / 3600
    quiet = open_sink(path, log_retention_hours=seconds)
    commit(quiet, orders(1, 3))
    commit(quiet, orders(4, 3))
    busy = open_sink(path, app_id="busy", log_retention_hours=seconds, compact_every=0)
    for start in range(1000, 1100):  # up to a checkpoint at version 100
        commit(busy, orders(start, 1))
    time.sleep(1.5)  # that checkpoint and the entries before it pass the retention
    for start in range(1100, 1200):  # the cleanup at version 200 removes them
        commit(busy, orders(start, 1))
    assert not (path / "_delta_log" / f"{2:020d}.json").exists()
    with pytest.raises(PositionConflict, match="left the log"):
        commit(quiet, orders(7, 3))
    assert quiet.open().position == 6
    commit(quiet, orders(7, 3))
    assert [s for s in sequences(path) if s < 1000] == list(range(1, 10))


def test_a_constraint_added_later_sends_appends_back_through_deltalake(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = open_sink(path)
    commit(sink, orders(1, 3))
    commit(sink, orders(4, 3))
    DeltaTable(str(path)).alter.add_constraint({"positive": "amount > 0"})
    try:
        commit(sink, orders(7, 3, coupon="X"))  # a new column: deltalake, which catches up
    except PositionConflict:  # a checkpoint's catch-up came before the constraint: stale
        sink.open()
        commit(sink, orders(7, 3, coupon="X"))
    with pytest.raises(SinkError, match=r"positive|constraint|amount"):
        commit(sink, orders(10, 3, coupon="Y", amount=-5.0))
    assert writers(path)[-1].startswith("delta-rs")
    assert sequences(path) == list(range(1, 10))


def test_statistics_skip_non_finite_floats_so_row_counts_stay_right(tmp_path: Path) -> None:
    path = tmp_path / "t"
    sink = open_sink(path)
    commit(sink, orders(1, 3))
    commit(sink, orders(4, 3, ratio=1.5))
    commit(sink, orders(7, 3, ratio=float("inf")))
    assert writers(path)[-1].startswith("nilus-dagster-")
    assert DeltaTable(str(path)).count() == 9
    assert file_statistics(pa.table({"x": [1.0, float("nan")]}))["minValues"] == {}


def test_rows_that_do_not_cast_to_the_table_go_through_deltalake(tmp_path: Path) -> None:
    path = tmp_path / "t"
    schema = pa.schema([pa.field("id", pa.string(), nullable=False)])
    DeltaTable.create(str(path), schema)
    sink = open_sink(path)
    with pytest.raises(SinkError):  # deltalake names the NOT NULL column it refuses
        commit(sink, orders(1, 3, id=None))
    assert DeltaTable(str(path)).count() == 0


def test_a_file_uri_with_escaped_characters_is_appended_to_directly(tmp_path: Path) -> None:
    folder = tmp_path / "my table"
    sink = open_sink(folder.as_uri())  # file:///.../my%20table
    commit(sink, orders(1, 3))
    commit(sink, orders(4, 3))
    assert writers(folder)[-1].startswith("nilus-dagster-")
    assert sequences(folder) == list(range(1, 7))


def test_log_entries_a_killed_writer_left_half_made_are_removed_when_old(tmp_path: Path) -> None:
    log = tmp_path / "_delta_log"
    log.mkdir()
    old, fresh = log / "_commit_old.json.tmp", log / "_commit_fresh.json.tmp"
    for entry in (old, fresh):
        entry.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_abandoned_entries(tmp_path, 3600) == 1
    assert not old.exists() and fresh.exists()
