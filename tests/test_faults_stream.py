"""The stream changes under the pipeline: retention expiry, purges, deletion and recreation.

What retention removed before it was ingested is a reported gap and nothing else is lost; a
stream deleted and recreated (between runs or during one) is a clear PositionError and nothing
of the new stream is written as if it were the old one.
"""

import threading
import time
from pathlib import Path

import pytest
from checker import check_exactly_once
from conftest import order, run_cli

from nilus_dagster.engine import measure_lag, run_pipeline
from nilus_dagster.errors import PositionError


def _recreate(publisher, stream: str) -> None:  # type: ignore[no-untyped-def]
    """The stream deleted and created again, empty, with the same subjects."""
    publisher.delete_stream(stream)
    publisher.create_stream(stream, [f"{stream}.>"])


def _first_seq(publisher, stream: str) -> int:  # type: ignore[no-untyped-def]
    import asyncio

    async def go(nc, js):  # type: ignore[no-untyped-def]
        return (await js.stream_info(stream)).state.first_seq

    return asyncio.run(publisher._with_js(go))


def test_max_age_expiry_past_the_position_is_a_gap_and_nothing_else_is_lost(
    publisher, stream_name, stream_pipeline, sink_address
):
    subject, pipeline = stream_pipeline(
        query="&batch_size=250", sink_address=sink_address, max_age=1.0
    )
    ingested = publisher.publish_orders(subject, 20)
    assert run_pipeline(pipeline).position == ingested[-1]
    expired = publisher.publish_orders(subject, 30, start=20)
    deadline = time.monotonic() + 15
    while _first_seq(publisher, stream_name) <= expired[-1] and time.monotonic() < deadline:
        time.sleep(0.1)
    fresh = publisher.publish_orders(subject, 10, start=50)

    assert measure_lag(pipeline).gap == len(expired)
    report = run_pipeline(pipeline)

    assert report.gap == len(expired)
    assert (report.first_seq, report.last_seq) == (fresh[0], fresh[-1])
    result = check_exactly_once(
        report.table_uri, ingested + fresh, pipeline.app_id, retention_lost=expired
    )
    assert result.ok and result.retention_lost == expired, str(result)
    # Reported once: the next run starts past the gap.
    assert run_pipeline(pipeline).gap == 0


def test_purge_past_a_partial_runs_position_is_one_gap(
    publisher, stream_name, stream_pipeline, sink_address
):
    subject, pipeline = stream_pipeline(query="&batch_size=250", sink_address=sink_address)
    published = publisher.publish_orders(subject, 2_000)
    first = run_pipeline(pipeline, max_messages=500)
    more = publisher.publish_orders(subject, 1_000, start=2_000)
    publisher.purge(stream_name, seq=1_501)  # removes 501..1500, never ingested

    report = run_pipeline(pipeline)

    assert first.position == 500
    assert report.gap == 1_000
    assert (report.first_seq, report.last_seq) == (1_501, more[-1])
    purged = published[500:1_500]
    result = check_exactly_once(
        report.table_uri,
        [s for s in published + more if s not in purged],
        pipeline.app_id,
        retention_lost=purged,
    )
    assert result.ok, str(result)


def test_stream_recreated_with_fewer_messages_is_a_clear_error_from_the_cli(
    publisher, stream_name, stream_pipeline, sink_address
):
    subject, pipeline = stream_pipeline(query="&batch_size=250", sink_address=sink_address)
    published = publisher.publish_orders(subject, 50)
    run_pipeline(pipeline)
    _recreate(publisher, stream_name)
    publisher.publish_orders(subject, 10, start=1_000)  # last_seq 10 < position 50

    done = run_cli("run", str(pipeline.path))

    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "recreated" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert measure_lag(pipeline).problem
    assert check_exactly_once(pipeline.table_location().uri, published, pipeline.app_id).ok


def test_stream_recreated_empty_is_a_clear_error(
    publisher, stream_name, stream_pipeline, sink_address
):
    subject, pipeline = stream_pipeline(query="&batch_size=250", sink_address=sink_address)
    published = publisher.publish_orders(subject, 5)
    run_pipeline(pipeline)
    _recreate(publisher, stream_name)

    with pytest.raises(PositionError, match="recreated"):
        run_pipeline(pipeline)
    assert check_exactly_once(pipeline.table_location().uri, published, pipeline.app_id).ok


def test_stream_recreated_during_a_run_writes_nothing_of_the_new_stream(
    publisher, stream_name, stream_pipeline
):
    subject, pipeline = stream_pipeline(
        query="&batch_size=250",
        sink_options="commit_max_rows: 500\ncheckpoint_every: 0\ncompact_every: 0\n",
    )
    published = publisher.publish_orders(subject, 30_000)
    table = Path(pipeline.table_location().uri)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["report"] = run_pipeline(pipeline, drain=True)
        except BaseException as exc:  # asserted below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not (table / "_delta_log" / f"{3:020d}.json").exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    _recreate(publisher, stream_name)
    # The new stream's sequences run past where the run was: same numbers, other messages.
    publisher.publish(subject, [{"order_id": f"new-{i}"} for i in range(40_000)])
    thread.join(60)

    assert isinstance(outcome.get("error"), PositionError), outcome
    assert "recreated" in str(outcome["error"])
    result = check_exactly_once(
        str(table),
        published,
        pipeline.app_id,
        keys={seq: order(i)["order_id"] for i, seq in enumerate(published)},
        key_column="order_id",
    )
    # Only a prefix of the old stream was written, none of the new one.
    assert not (result.corrupted or result.duplicated or result.unexpected), str(result)
    assert result.position_matches, str(result)
    assert result.lost == published[result.position :], str(result)
    with pytest.raises(PositionError, match="recreated"):
        run_pipeline(pipeline)
