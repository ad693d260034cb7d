"""Decoding ahead (parts of a commit's chunk decoded while the pull goes on) writes exactly what
decoding the whole chunk at commit time writes: same rows, columns, types and dead letters."""

import json

import pytest
from checker import check_exactly_once
from deltalake import DeltaTable

import nilus_dagster.engine.run as engine_run
from nilus_dagster.engine import run_pipeline, runtime_settings
from nilus_dagster.engine.table import open_sink
from nilus_dagster.manifest import parse_pipeline
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import DeltaSink

CHUNK, PART = 200, 50
_SAME_BATCH = " or earlier messages of the batch"


def _payloads(kind: str, n: int = 2 * CHUNK) -> list[bytes]:
    def one(i: int) -> object:
        if kind == "orders":
            return {"order_id": f"o{i}", "amount": i * 1.5, "items": [{"q": i}], "at": "2025-01-01"}
        if kind == "new-field-mid-chunk":
            return {"i": i, **({"extra": f"e{i}"} if i >= 130 else {})}
        if kind == "type-change-across-parts":
            return {"i": i, "x": i if i < 120 or i >= 280 else f"text{i}"}
        if kind == "conflict-inside-one-part":
            return {"i": i, "x": f"text{i}" if 110 <= i < 115 else i}
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


def _contents(uri: str) -> tuple[list[str], list[dict], list[tuple]]:
    table = DeltaTable(uri).to_pyarrow_table().sort_by("_nats_seq")
    try:
        dead = DeltaTable(uri + "__dead_letters").to_pyarrow_table().sort_by("_nats_seq")
        # Whether a conflict was found against the table alone or also against other rows of
        # the same read is the only thing the error text may say differently.
        dead_rows = [
            (r["_nats_seq"], r["_nats_data"], r["error"].replace(_SAME_BATCH, ""))
            for r in dead.to_pylist()
        ]
    except Exception:  # no dead letters, no table
        dead_rows = []
    return [f"{f.name}: {f.type}" for f in table.schema], table.to_pylist(), dead_rows


@pytest.mark.parametrize(
    ("kind", "falls_back"),
    [
        ("orders", False),
        ("new-field-mid-chunk", True),
        ("type-change-across-parts", True),
        ("conflict-inside-one-part", False),
        ("poison-in-parts", False),
    ],
)
def test_parts_decoded_ahead_commit_what_the_whole_chunk_commits(
    kind, falls_back, write_manifest, monkeypatch
):
    payloads = _payloads(kind)
    prepared: list[int] = []
    prepare = DeltaSink.prepare

    def spy(self, batch, **kwargs):
        prepared.append(len(batch))
        return prepare(self, batch, **kwargs)

    monkeypatch.setattr(DeltaSink, "prepare", spy)

    def committer(name: str) -> engine_run._Committer:
        address = "nats+jetstream://localhost:4222?subject=orders.created"
        pipeline = parse_pipeline(
            write_manifest(name=name, address=address, stream="S", dest_table=f"a.{name}")
        )
        settings = runtime_settings(pipeline)
        sink = open_sink(settings)
        sink.open()
        return engine_run._Committer(sink, settings, "2025-01-01T00:00:00+00:00")

    ahead, whole = committer("ahead"), committer("whole")
    for start in range(0, len(payloads), CHUNK):
        chunk = _batch(payloads, start, start + CHUNK)
        prepared.clear()
        for part_start in range(start, start + CHUNK - PART, PART):  # the last part at commit
            ahead.prepare_part(_batch(payloads, part_start, part_start + PART))
        ahead.commit(chunk)
        assert (CHUNK in prepared) == (falls_back and start == 0), prepared
        whole.commit(chunk)

    assert _contents(ahead.sink.location.uri) == _contents(whole.sink.location.uri)
    assert (ahead.rows, ahead.dead, ahead.messages) == (whole.rows, whole.dead, whole.messages)
    assert ahead.sink.position == whole.sink.position == len(payloads)


def test_a_drain_decodes_ahead_and_commits_every_message_once(
    nats_server, publisher, stream_name, write_manifest, monkeypatch
):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    seqs = publisher.publish_orders(subject, 10_000)
    address = f"nats+jetstream://{nats_server.hostport}?subject={subject}&batch_size=100"
    pipeline = parse_pipeline(
        write_manifest(
            address=address, stream=stream_name, extra_sink_options="commit_max_rows: 1000\n"
        )
    )
    parts: list[int] = []
    prepare_part = engine_run._Committer.prepare_part

    def counting(self, part):
        parts.append(len(part))
        return prepare_part(self, part)

    monkeypatch.setattr(engine_run._Committer, "prepare_part", counting)

    report = run_pipeline(pipeline, drain=True)

    assert parts and max(parts) < 1000, parts
    assert report.messages == 10_000 and report.commits == 10
    assert check_exactly_once(report.table_uri, seqs, pipeline.app_id).ok
