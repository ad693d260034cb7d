"""The core end-to-end engine behaviour on the wheel's nats-server and on the system 2.9.

Drain, resume, lag, a gap after a purge, a recreated stream and a durable consumer, each
ending with the checker, against both servers (``any_nats_server``). Where 2.9 differs (it
clamps ``opt_start_seq`` past the stream's end; it drops ``filter_subjects``) the difference
is measured here too, and the engine must not depend on it.
"""

import asyncio
import json

import nats
import pytest
from checker import check_exactly_once, consumer_state
from conftest import Publisher, order
from nats.js.api import ConsumerConfig, DeliverPolicy

from nilus_dagster.engine import measure_lag, run_pipeline
from nilus_dagster.errors import PositionError
from nilus_dagster.manifest import parse_pipeline


@pytest.fixture
def setup(any_nats_server, stream_name, write_manifest):  # type: ignore[no-untyped-def]
    subject = f"{stream_name}.orders"
    publisher = Publisher(any_nats_server.url)
    publisher.create_stream(stream_name, [f"{stream_name}.>"])

    def pipeline(query: str = "", **kwargs: object):  # type: ignore[no-untyped-def]
        address = (
            f"nats+jetstream://{any_nats_server.hostport}?subject={subject}&batch_size=100{query}"
        )
        return parse_pipeline(write_manifest(address=address, stream=stream_name, **kwargs))

    return publisher, stream_name, subject, pipeline


def _keys(published: list[int], start: int = 0) -> dict[int, object]:
    return {seq: order(start + i)["order_id"] for i, seq in enumerate(published)}


def test_drain_resume_and_lag(setup):
    publisher, stream, subject, pipeline = setup
    first = publisher.publish_orders(subject, 700)
    publisher.publish(f"{stream}.other", [{"noise": i} for i in range(30)])
    pipe = pipeline(extra_sink_options="commit_max_rows: 250\n")

    partial = run_pipeline(pipe, max_messages=300)
    lag = measure_lag(pipe)
    rest = run_pipeline(pipe)
    second = publisher.publish_orders(subject, 50, start=700)
    last = run_pipeline(pipe)

    assert partial.position == 300
    assert (lag.position, lag.sequence_lag, lag.stream_last_seq) == (300, 400, 730)
    assert (rest.first_seq, rest.last_seq, rest.sequence_lag) == (301, 700, 0)
    assert (last.first_seq, last.last_seq) == (second[0], second[-1])
    result = check_exactly_once(
        last.table_uri,
        first + second,
        pipe.app_id,
        keys={**_keys(first), **_keys(second, 700)},
        key_column="order_id",
    )
    assert result.ok, str(result)


def test_gap_after_a_purge(setup):
    publisher, stream, subject, pipeline = setup
    first = publisher.publish_orders(subject, 100)
    pipe = pipeline()
    run_pipeline(pipe)
    more = publisher.publish_orders(subject, 100, start=100)
    publisher.purge(stream, seq=151)  # 101..150 never ingested

    assert measure_lag(pipe).gap == 50
    report = run_pipeline(pipe)

    assert report.gap == 50 and (report.first_seq, report.last_seq) == (151, 200)
    result = check_exactly_once(
        report.table_uri, first + more[50:], pipe.app_id, retention_lost=more[:50]
    )
    assert result.ok, str(result)


@pytest.mark.parametrize("refill", [0, 3, 500])
def test_recreated_stream_is_refused(setup, refill):
    # 3 messages: last_seq < position (2.9 would clamp a consumer started past it and deliver
    # them); 500: last_seq > position, told apart by the creation time only.
    publisher, stream, subject, pipeline = setup
    published = publisher.publish_orders(subject, 100)
    pipe = pipeline()
    run_pipeline(pipe)
    publisher.delete_stream(stream)
    publisher.create_stream(stream, [f"{stream}.>"])
    if refill:
        publisher.publish_orders(subject, refill, start=10_000)

    with pytest.raises(PositionError, match="recreated"):
        run_pipeline(pipe)
    assert measure_lag(pipe).problem
    result = check_exactly_once(
        pipe.table_location().uri,
        published,
        pipe.app_id,
        keys=_keys(published),
        key_column="order_id",
    )
    assert result.ok, str(result)


def test_durable_consumer_is_moved_along_and_resumes(setup, any_nats_server):
    publisher, stream, subject, pipeline = setup
    first = publisher.publish_orders(subject, 400)
    pipe = pipeline("&durable=nilus_compat&ack_policy=all")

    one = run_pipeline(pipe, max_messages=150)
    after_one = consumer_state(any_nats_server.url, stream, "nilus_compat")
    two = run_pipeline(pipe)
    second = publisher.publish_orders(subject, 100, start=400)
    three = run_pipeline(pipe)

    # The durable is moved after each commit (2.9 recreates it: its ack floor restarts at 0).
    assert after_one["delivered"] == one.position == 150
    assert not two.realigned and not three.realigned
    assert (three.first_seq, three.last_seq) == (second[0], second[-1])
    state = consumer_state(any_nats_server.url, stream, "nilus_compat")
    assert state["delivered"] == three.position == second[-1]
    assert state["num_ack_pending"] == 0
    result = check_exactly_once(three.table_uri, first + second, pipe.app_id)
    assert result.ok, str(result)


def _past_end(url: str, stream: str, subject: str) -> list[int]:
    """Create a consumer at sequence 9 of a 6-message stream, publish 4 more, fetch."""

    async def go() -> list[int]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.add_consumer(
                stream,
                ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=9,
                    filter_subject=subject,
                ),
            )
            for i in range(4):
                await js.publish(subject, json.dumps(order(100 + i)).encode())
            sub = await js.pull_subscribe_bind(info.name, stream=stream)
            msgs = await sub.fetch(10, timeout=1)
            return [m.metadata.sequence.stream for m in msgs]
        finally:
            await nc.close()

    return asyncio.run(go())


def _filter_subjects_kept(url: str, stream: str, subject: str) -> bool:
    async def go() -> bool:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.add_consumer(
                stream, ConsumerConfig(filter_subjects=[subject], deliver_policy=DeliverPolicy.ALL)
            )
            return bool(info.config.filter_subjects)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_measured_server_differences(setup, any_nats_server):
    publisher, stream, subject, _ = setup
    publisher.publish_orders(subject, 6)
    is_29 = "/usr/sbin/" in any_nats_server.binary

    delivered = _past_end(any_nats_server.url, stream, subject)
    kept = _filter_subjects_kept(any_nats_server.url, stream, subject)

    # A start past the end (9 of 6, then 7..10 published): 2.15 honours it, 2.9 clamps it and
    # delivers 7 and 8 too. The engine never asks for this: a position past last_seq is
    # refused first (test_recreated_stream_is_refused).
    assert delivered == ([7, 8, 9, 10] if is_29 else [9, 10])
    # filter_subjects (2.10+) is dropped silently by 2.9: the engine uses filter_subject and
    # checks the returned config (consumers.verify_created).
    assert kept is not is_29
