"""A durable consumer (durable=NAME, ack_policy=all) whose server-side position disagrees with
the table: moved ahead or behind by another client, or made with other settings.

The table is the truth: the engine realigns the consumer to the table's position, ingests
from there exactly once through a consumer of its own, and moves the durable after each commit,
so afterwards the durable stands at the table's position with nothing unacknowledged. On
nats-server 2.15 and on the system 2.9 (which moves a durable by recreating it, so its ack
floor restarts at 0: the delivered sequence is the position there).
"""

import asyncio
from datetime import datetime, timedelta, timezone

import nats
import pytest
from checker import check_exactly_once, consumer_state
from conftest import Publisher, order
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from nilus_dagster.engine import run_pipeline
from nilus_dagster.manifest import parse_pipeline

DURABLE = "nilus_durable"


def _consume_and_ack(url: str, stream: str, subject: str, count: int, unacked: int = 0) -> int:
    """Fetch ``count`` messages from the durable as another client would, ack them all (AckAll
    on the last), then fetch ``unacked`` more and leave them unacknowledged."""

    async def go() -> int:
        nc = await nats.connect(url)
        try:
            sub = await nc.jetstream().pull_subscribe_bind(DURABLE, stream=stream)
            got = []
            while len(got) < count:
                got += await sub.fetch(min(250, count - len(got)), timeout=5)
            await got[-1].ack_sync()
            if unacked:
                await sub.fetch(unacked, timeout=5)
            return got[-1].metadata.sequence.stream
        finally:
            await nc.close()

    return asyncio.run(go())


def _create_durable(url: str, stream: str, subject: str, **config: object) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=DURABLE,
                    filter_subject=subject,
                    deliver_policy=DeliverPolicy.ALL,
                    **config,  # type: ignore[arg-type]
                ),
            )
        finally:
            await nc.close()

    asyncio.run(go())


def _manifest(  # type: ignore[no-untyped-def]
    write_manifest, server, stream, subject, query, sink_address=None
):
    return parse_pipeline(
        write_manifest(
            address=f"nats+jetstream://{server.hostport}?subject={subject}&batch_size=100{query}",
            stream=stream,
            extra_sink_options="commit_max_rows: 150\n",
            sink_address=sink_address or "dataos://lake?purpose=rw",
        )
    )


def _check(pipeline, published: list[int]) -> None:  # type: ignore[no-untyped-def]
    result = check_exactly_once(
        pipeline.table_location().uri,
        published,
        pipeline.app_id,
        keys={seq: order(i)["order_id"] for i, seq in enumerate(published)},
        key_column="order_id",
    )
    assert result.ok, str(result)


def test_durable_acked_ahead_of_the_table_is_realigned(
    any_nats_server, stream_name, write_manifest, sink_address
):
    # Into PostgreSQL, the position the durable is realigned to is the position row's.
    subject = f"{stream_name}.orders"
    publisher = Publisher(any_nats_server.url)
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    published = publisher.publish_orders(subject, 1_000)
    query = f"&durable={DURABLE}&ack_policy=all"
    pipeline = _manifest(write_manifest, any_nats_server, stream_name, subject, query, sink_address)
    first = run_pipeline(pipeline, max_messages=200)
    assert consumer_state(any_nats_server.url, stream_name, DURABLE)["delivered"] == 200
    # Another client reads on: acks through 500 and holds 50 more unacknowledged.
    assert _consume_and_ack(any_nats_server.url, stream_name, subject, 300, unacked=50) == 500

    report = run_pipeline(pipeline, drain=True)

    assert first.position == 200
    assert report.realigned
    metadata = report.metadata()
    assert metadata["nilus/durable"] == DURABLE
    assert metadata["nilus/realigned"].startswith("it has 50 delivered but unacknowledged")
    assert "nilus/realigned" not in first.metadata()
    assert (report.first_seq, report.last_seq) == (201, 1_000)
    _check(pipeline, published)
    state = consumer_state(any_nats_server.url, stream_name, DURABLE)
    assert state["delivered"] == report.position == 1_000, state
    assert state["num_ack_pending"] == 0, state


@pytest.mark.parametrize("kind", ["behind", "explicit-acks", "ack-none"])
def test_durable_behind_or_otherwise_made_is_realigned(
    any_nats_server, stream_name, write_manifest, kind
):
    subject = f"{stream_name}.orders"
    publisher = Publisher(any_nats_server.url)
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    published = publisher.publish_orders(subject, 800)
    # The table gets to 800 through ephemeral consumers; the durable is made by someone else.
    run_pipeline(_manifest(write_manifest, any_nats_server, stream_name, subject, ""))
    policy = {"behind": AckPolicy.ALL, "explicit-acks": AckPolicy.EXPLICIT}.get(
        kind, AckPolicy.NONE
    )
    _create_durable(any_nats_server.url, stream_name, subject, ack_policy=policy)
    if kind == "behind":
        _consume_and_ack(any_nats_server.url, stream_name, subject, 200)
    published += publisher.publish_orders(subject, 300, start=800)
    pipeline = _manifest(
        write_manifest, any_nats_server, stream_name, subject, f"&durable={DURABLE}&ack_policy=all"
    )

    report = run_pipeline(pipeline, drain=True)

    assert report.realigned
    assert (report.first_seq, report.last_seq) == (801, 1_100)
    _check(pipeline, published)
    state = consumer_state(any_nats_server.url, stream_name, DURABLE)
    assert state["delivered"] == 1_100, state
    assert state["num_ack_pending"] == 0, state


def test_window_replay_leaves_the_durable_at_the_position(
    any_nats_server, stream_name, write_manifest
):
    """A backfill replays old messages through a reader of its own: the durable, which
    mirrors the position, is left where it is (replays through it once left every replayed
    message unacknowledged on it, and the next run had to realign it)."""
    subject = f"{stream_name}.orders"
    publisher = Publisher(any_nats_server.url)
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    published = publisher.publish_orders(subject, 300)
    pipeline = _manifest(
        write_manifest, any_nats_server, stream_name, subject, f"&durable={DURABLE}&ack_policy=all"
    )
    run_pipeline(pipeline, drain=True)
    window = (datetime.now(timezone.utc) - timedelta(hours=1), datetime.now(timezone.utc))

    replay = run_pipeline(pipeline, window=window)

    assert replay.rows_written == 300
    assert not replay.realigned
    assert "nilus/durable" not in replay.metadata()  # the replay did not touch it
    _check(pipeline, published)
    state = consumer_state(any_nats_server.url, stream_name, DURABLE)
    assert (state["delivered"], state["num_pending"], state["num_ack_pending"]) == (
        published[-1],
        0,
        0,
    ), state
    assert not run_pipeline(pipeline, drain=True).realigned
