"""Writing ahead into PostgreSQL: each part of a chunk is loaded into the commit's transaction as
soon as it is decoded. The table then holds exactly what committing the whole chunk at once
writes, nothing of it is visible before the commit, and what a failed drain wrote ahead never
reaches the table."""

import json
import threading
import time

import pytest

from nilus_dagster.engine import runtime_settings
from nilus_dagster.engine.committer import Committer
from nilus_dagster.engine.table import open_sink
from nilus_dagster.manifest import parse_pipeline
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.postgres import PostgresSink

CHUNK, PART = 200, 50
CREATED = "2025-01-01T00:00:00+00:00"
_SAME_BATCH = " or earlier messages of the batch"


def _payloads(kind: str, n: int = 2 * CHUNK) -> list[bytes]:
    def one(i: int) -> object:
        if kind == "orders":
            return {"order_id": f"o{i}", "amount": i * 1.5, "items": [{"q": i}], "at": "2025-01-01"}
        if kind == "new-field-mid-chunk":
            return {"i": i, **({"extra": f"e{i}"} if i >= 130 else {})}
        if kind == "type-change-across-parts":
            return {"i": i, "x": i if i < 120 or i >= 280 else f"text{i}"}
        if kind == "poison-in-parts":
            return b"not json" if i in (7, 77, 177, 260) else {"i": i}
        raise ValueError(kind)

    return [p if isinstance(p, bytes) else json.dumps(p).encode() for p in map(one, range(n))]


def _batch(payloads: list[bytes], start: int, stop: int) -> MessageBatch:
    return MessageBatch(
        sequences=list(range(start + 1, stop + 1)),
        timestamps_ns=[1_735_689_600_000_000_000 + i * 1_000_000 for i in range(start, stop)],
        subjects=["orders.created"] * (stop - start),
        payloads=payloads[start:stop],
    )


def _committer(db, write_manifest, table: str) -> Committer:  # type: ignore[no-untyped-def]
    address = "nats+jetstream://localhost:4222?subject=orders.created"
    path = write_manifest(
        name=table, address=address, stream="S", dest_table=f"a.{table}", sink_address=db.url
    )
    settings = runtime_settings(parse_pipeline(path))
    sink = open_sink(settings)
    sink.open()
    return Committer(sink, settings, CREATED)


def _contents(db, table: str) -> tuple[list[tuple], list[dict], list[tuple]]:  # type: ignore[no-untyped-def]
    import psycopg
    from psycopg.rows import dict_row

    columns = db.query(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'a' AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    with psycopg.connect(db.url, row_factory=dict_row) as conn:
        rows = conn.execute(f"SELECT * FROM a.{table} ORDER BY _nats_seq").fetchall()
        found = conn.execute("SELECT to_regclass(%s)", (f"a.{table}__dead_letters",)).fetchone()
        dead = []
        if found and found["to_regclass"]:
            dead = [
                (r["_nats_seq"], bytes(r["_nats_data"]), r["error"].replace(_SAME_BATCH, ""))
                for r in conn.execute(
                    f"SELECT * FROM a.{table}__dead_letters ORDER BY _nats_seq"
                ).fetchall()
            ]
    return columns, rows, dead


@pytest.mark.parametrize(
    ("kind", "first_chunk_ahead"),
    [
        ("orders", [True] * 3),
        # The third part has the new field: it and the rest are decoded with the whole chunk.
        ("new-field-mid-chunk", [True] * 2),
        # Part three keeps x as a number (its strings are dead letters); the rest of the
        # chunk has only strings, so the commit drops what was written ahead.
        ("type-change-across-parts", [True] * 3),
        ("poison-in-parts", [True] * 3),
    ],
)
def test_parts_written_ahead_commit_what_the_whole_chunk_commits(
    kind, first_chunk_ahead, postgres_database, write_manifest, monkeypatch
):
    db = postgres_database
    payloads = _payloads(kind)
    written: list[bool] = []
    write_ahead = PostgresSink.write_ahead

    def spy(self, decoded, **kwargs):  # type: ignore[no-untyped-def]
        written.append(result := write_ahead(self, decoded, **kwargs))
        return result

    monkeypatch.setattr(PostgresSink, "write_ahead", spy)
    ahead = _committer(db, write_manifest, "ahead")
    whole = _committer(db, write_manifest, "whole")
    for start in range(0, len(payloads), CHUNK):
        chunk = _batch(payloads, start, start + CHUNK)
        written.clear()
        for part_start in range(start, start + CHUNK - PART, PART):  # the last part at commit
            ahead.prepare_part(_batch(payloads, part_start, part_start + PART))
        if start == 0:
            assert written == first_chunk_ahead
            # Nothing written ahead is visible before the commit.
            assert db.query("SELECT to_regclass('a.ahead')") == [(None,)]
        ahead.commit(chunk)
        whole.commit(chunk)

    assert _contents(db, "ahead") == _contents(db, "whole")
    assert (ahead.rows, ahead.dead, ahead.messages) == (whole.rows, whole.dead, whole.messages)
    assert ahead.sink.position == whole.sink.position == len(payloads)


def test_what_a_failed_drain_wrote_ahead_never_reaches_the_table(postgres_database, write_manifest):
    db = postgres_database
    payloads = _payloads("orders")
    committer = _committer(db, write_manifest, "orders")
    committer.commit(_batch(payloads, 0, CHUNK))
    for part_start in (CHUNK, CHUNK + PART):
        committer.prepare_part(_batch(payloads, part_start, part_start + PART))
    # Written ahead, not committed: readers still see the first chunk only.
    assert db.query("SELECT count(*), max(_nats_seq) FROM a.orders") == [(CHUNK, CHUNK)]

    committer.drop_parts()  # what drain_to does when the pull fails before the commit
    # A service drains again through the same sink, from the position: each row once.
    committer.prepare_part(_batch(payloads, CHUNK, CHUNK + PART))
    committer.commit(_batch(payloads, CHUNK, 2 * CHUNK))
    assert db.query("SELECT count(*), count(DISTINCT _nats_seq) FROM a.orders") == [
        (2 * CHUNK, 2 * CHUNK)
    ]
    assert db.query("SELECT last_seq FROM a.nilus_positions") == [(2 * CHUNK,)]


def test_writing_ahead_holds_the_position_lock_and_a_second_writer_conflicts(
    postgres_database, write_manifest
):
    db = postgres_database
    payloads = _payloads("orders")
    first = _committer(db, write_manifest, "orders")
    first.commit(_batch(payloads, 0, PART))
    second = _committer(db, write_manifest, "orders")
    first.prepare_part(_batch(payloads, PART, 2 * PART))  # locks the position row

    # The second writer's part waits on the lock; the first commits; the second then finds
    # the position moved, writes nothing ahead, and its commit keeps only what is new.
    thread = threading.Thread(target=second.prepare_part, args=(_batch(payloads, PART, CHUNK),))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()
    first.commit(_batch(payloads, PART, 3 * PART))
    thread.join(10)
    assert not thread.is_alive()
    second.commit(_batch(payloads, PART, CHUNK))
    assert db.query("SELECT count(*), count(DISTINCT _nats_seq), max(_nats_seq) FROM a.orders") == [
        (CHUNK, CHUNK, CHUNK)
    ]
