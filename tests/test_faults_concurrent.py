"""Two runs of one pipeline at once, as separate processes (the CLI), with poison payloads.

Dagster's pool keeps one run per pipeline, but nothing stops a CLI backfill next to a sensor
run. The table's position is read and written through one snapshot, so the slower writer's
commit conflicts, re-reads the position and writes only what is still its own.
"""

import subprocess

import pytest
from checker import check_orders, consumer_state
from conftest import order, start_cli_run


def _payloads(start: int, count: int) -> list[bytes | dict[str, object]]:
    return [b"{broken %d" % i if i % 41 == 3 else order(i) for i in range(start, start + count)]


def _run(path: object) -> subprocess.Popen[str]:
    return start_cli_run(path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# With a shared durable, both runs once read from it, and one run's deliveries went to the
# other's pulls (about 1 round in 6 lost a stretch of messages under load); runs now read
# through consumers of their own and only move the durable after their commits.
@pytest.mark.parametrize("query", ["", "&durable=nilus_twice&ack_policy=all"])
def test_two_processes_running_one_pipeline_write_every_sequence_once(
    nats_server, publisher, stream_name, stream_pipeline, query
):
    subject, pipeline = stream_pipeline(
        query=f"&batch_size=200{query}", sink_options="commit_max_rows: 400\ncheckpoint_every: 0\n"
    )
    published: list[int] = []
    payloads: list[bytes | dict[str, object]] = []
    conflicts = 0
    for round_ in range(3):
        batch = _payloads(round_ * 6_000, 6_000)
        published += publisher.publish(subject, batch)
        payloads += batch
        runs = [_run(pipeline.path) for _ in range(2)]
        outputs = [run.communicate(timeout=120) for run in runs]
        for run, (_, err) in zip(runs, outputs, strict=True):
            assert run.returncode == 0, err
            conflicts += err.count("a concurrent commit moved the position")

    assert conflicts, "the two runs never overlapped"
    result = check_orders(pipeline.table_location().uri, published, pipeline.app_id, payloads)
    assert result.ok, str(result)
    if query:
        # The two runs move the durable in turn, so the last move may be the slower run's;
        # whichever it was, the next run puts it where the table is.
        last = _run(pipeline.path)
        _, err = last.communicate(timeout=60)
        assert last.returncode == 0, err
        state = consumer_state(nats_server.url, stream_name, "nilus_twice")
        assert state["ack_floor"] == state["delivered"] == published[-1], (state, err)
        assert state["num_pending"] == state["num_ack_pending"] == 0, state


@pytest.mark.parametrize("stale", ["last_seq", "created"])
def test_a_position_newer_than_the_stream_read_beside_it_is_no_recreated_stream(
    publisher, stream_pipeline, monkeypatch, stale
):
    """The stream is read while the sink opens; another writer (a service run, during a
    backfill) can commit between the two reads. Its position is then past the stream's end as
    read, or was read from a stream recreated since (its creation time differs); neither is a
    sign of a recreated stream until a stream read after the position says so."""
    import dataclasses
    from datetime import timedelta

    from nilus_dagster.engine import run_pipeline
    from nilus_dagster.jetstream.source import JetStreamSource

    subject, pipeline = stream_pipeline()
    published = publisher.publish_orders(subject, 50)
    run_pipeline(pipeline, drain=True)
    published += publisher.publish_orders(subject, 10, start=50)
    real = JetStreamSource.stream_state
    reads: list[int] = []

    async def read_before_the_other_writers_commit(self):  # type: ignore[no-untyped-def]
        state = await real(self)
        reads.append(state.last_seq)
        if len(reads) == 1 and stale == "last_seq":
            return dataclasses.replace(state, last_seq=45, messages=45)
        if len(reads) == 1:  # the stream as it was before it was recreated
            return dataclasses.replace(state, created=state.created - timedelta(minutes=5))
        return state

    monkeypatch.setattr(JetStreamSource, "stream_state", read_before_the_other_writers_commit)
    report = run_pipeline(pipeline, drain=True)

    assert report.position == published[-1] and len(reads) >= 2
    result = check_orders(
        report.table_uri, published, pipeline.app_id, [order(i) for i in range(60)]
    )
    assert result.ok, str(result)
