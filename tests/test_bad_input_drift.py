"""Poison payloads and schema drift in the middle of a batch, through the engine.

A field that changes type goes to the dead letters with its exact bytes and an error naming
the field; a new field adds a column; every message is a row or a dead letter, never lost.
"""

import json

import pytest
from checker import check_exactly_once
from conftest import run_cli
from deltalake import DeltaTable

from nilus_dagster.engine import run_pipeline


def _row(i: int, **extra: object) -> dict[str, object]:
    return {"id": i, "amount": i * 1.5, "tags": ["a", "b"], "meta": {"n": i}, **extra}


@pytest.mark.parametrize("table_exists", [True, False])
def test_type_changes_mid_batch_are_dead_letters_and_new_fields_are_columns(
    publisher, stream_pipeline, table_exists
):
    subject, pipe = stream_pipeline("events", query="&batch_size=500")
    published: list[int] = []
    if table_exists:
        published += publisher.publish(subject, [_row(i) for i in range(50)])
        run_pipeline(pipe)
    drifted: dict[int, bytes] = {}
    batch: list[bytes | dict[str, object]] = []
    for i in range(50, 250):
        if i == 120:
            batch.append(json.dumps(_row(i, amount="12.50")).encode())  # number -> text
        elif i == 130:
            batch.append(json.dumps(_row(i, meta="flat")).encode())  # struct -> text
        elif i == 140:
            batch.append(json.dumps(_row(i, tags={"x": 1})).encode())  # list -> struct
        elif i == 150:
            batch.append(json.dumps(_row(i, id="id-150")).encode())  # integer -> text
        elif i == 160:
            batch.append(b'{"id": 160, "amount": ')  # truncated JSON
        elif i >= 100:
            batch.append(_row(i, coupon=f"C{i}", meta={"n": i, "extra": True}))  # growth
        else:
            batch.append(_row(i))
    seqs = publisher.publish(subject, batch)
    published += seqs
    for seq, payload in zip(seqs, batch, strict=True):
        if isinstance(payload, bytes):
            drifted[seq] = payload

    report = run_pipeline(pipe)

    assert report.dead_letters == len(drifted)
    result = check_exactly_once(report.table_uri, published, pipe.app_id, expect_dead=list(drifted))
    assert result.ok, str(result)
    dead = DeltaTable(report.table_uri + "__dead_letters").to_pyarrow_table().to_pylist()
    by_seq = {d["_nats_seq"]: d for d in dead}
    assert {s: bytes(by_seq[s]["_nats_data"]) for s in drifted} == drifted
    assert all(by_seq[s]["error"] for s in drifted)
    for seq, field in zip(list(drifted)[:4], ["amount", "meta", "tags", "id"], strict=True):
        assert field in by_seq[seq]["error"], by_seq[seq]["error"]
    rows = {r["_nats_seq"]: r for r in DeltaTable(report.table_uri).to_pyarrow_table().to_pylist()}
    grown = seqs[100 - 50]
    assert rows[grown]["coupon"] == "C100" and rows[grown]["meta"] == {"n": 100, "extra": True}
    assert rows[seqs[0]]["coupon"] is None and rows[seqs[0]]["meta"]["extra"] is None


def test_a_big_batch_missing_a_nested_column_does_not_abort_the_process(publisher, stream_pipeline):
    # Arrow reads a batch over 4 MB in several blocks, so its columns come in several chunks
    # while the nulls padding the table's missing nested column came in one: deltalake 1.6.6
    # then panicked on the sliced nested struct and aborted the whole process (SIGABRT).
    # In a subprocess, so that a regression fails this test rather than the test run.
    subject, pipeline = stream_pipeline(
        "big",
        query="&batch_size=1000",
        sink_options="commit_max_rows: 20000\ncommit_max_bytes: 100000000\n",
    )
    first = publisher.publish(subject, [{"id": 0, "meta": {"x": {"y": 1}}}])
    run_pipeline(pipeline)
    pad = "p" * 900
    rest = publisher.publish(subject, [{"id": i, "pad": pad} for i in range(1, 12_001)])

    done = run_cli("run", str(pipeline.path), timeout=120)

    assert done.returncode == 0, done.stderr[-2000:]
    result = check_exactly_once(pipeline.table_location().uri, first + rest, pipeline.app_id)
    assert result.ok, str(result)
