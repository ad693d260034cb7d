"""Pulling through JetStreamSource and BulkPuller, on the wheel's server and on 2.9."""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TypeVar

import nats
import pytest
from conftest import Publisher

from nilus_dagster.jetstream import BulkPuller, JetStreamSource, parse_ack_reply
from nilus_dagster.jetstream.ack import ack_fields, ack_fields_each
from nilus_dagster.jetstream.errors import PullInterrupted
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest.address import parse_nats_address
from nilus_dagster.messages import MessageBatch

T = TypeVar("T")


def source_for(
    server: LocalNatsServer, stream: str, subject: str, options: str = "", **kwargs: object
) -> JetStreamSource:
    query = f"subject={subject}" + (f"&{options}" if options else "")
    addr = parse_nats_address(f"nats+jetstream://{server.hostport}?{query}")
    return JetStreamSource(addr, stream, **kwargs)  # type: ignore[arg-type]


def with_source(
    server: LocalNatsServer,
    stream: str,
    subject: str,
    work: Callable[[JetStreamSource], Awaitable[T]],
    options: str = "",
) -> T:
    async def go() -> T:
        async with source_for(server, stream, subject, options) as source:
            return await work(source)

    return asyncio.run(go())


async def collect(source: JetStreamSource, start: int = 1, **kwargs: object) -> list[MessageBatch]:
    return [batch async for batch in source.messages(start, **kwargs)]  # type: ignore[arg-type]


def seqs(batches: list[MessageBatch]) -> list[int]:
    return [s for b in batches for s in b.sequences]


async def consumer_names(url: str, stream: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return [c.name for c in await nc.jetstream().consumers_info(stream)]
    finally:
        await nc.close()


def test_every_message_once_in_order_with_its_metadata(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [f"{stream_name}.>"])
    subject = f"{stream_name}.orders"
    before = time.time_ns()
    published = pub.publish_orders(subject, 1500)
    after = time.time_ns()
    batches = with_source(any_nats_server, stream_name, subject, collect, "batch_size=100")
    assert seqs(batches) == published
    for batch in batches:
        assert batch.sequences == sorted(batch.sequences)
        assert set(batch.subjects) == {subject}
        assert batch.headers is None
        assert all(before - 10**9 < ts < after + 10**9 for ts in batch.timestamps_ns)
    assert json.loads(batches[0].payloads[0])["order_id"] == "ord-000000000"
    assert json.loads(batches[-1].payloads[-1])["order_id"] == "ord-000001499"
    assert batches[-1].num_pending == 0
    # Batches are pulls of 100, or more when several have arrived by the time we look.
    assert all(len(b) >= 1 for b in batches)


def test_other_subjects_in_the_stream_are_skipped(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [f"{stream_name}.>"])
    wanted: list[int] = []
    for i in range(5):
        wanted += pub.publish_orders(f"{stream_name}.a", 30, start=i * 30)
        pub.publish_orders(f"{stream_name}.b", 7)
    batches = with_source(any_nats_server, stream_name, f"{stream_name}.a", collect)
    assert seqs(batches) == wanted
    assert {s for b in batches for s in b.subjects} == {f"{stream_name}.a"}


def test_wildcard_subject(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [f"{stream_name}.>"])
    a = pub.publish_orders(f"{stream_name}.x.a", 3)
    pub.publish_orders(f"{stream_name}.y", 3)
    b = pub.publish_orders(f"{stream_name}.x.b", 3)
    batches = with_source(any_nats_server, stream_name, f"{stream_name}.x.*", collect)
    assert seqs(batches) == a + b


def test_headers_only_when_present(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish(stream_name, [b"{}"] * 2)
    pub.publish(stream_name, [b"{}"], headers={"trace-id": "t1", "source": "web"})
    pub.publish(stream_name, [b"{}"])
    batch = MessageBatch()
    for b in with_source(any_nats_server, stream_name, stream_name, collect):
        batch.extend(b)
    assert batch.headers is not None
    assert [h and dict(h) for h in batch.headers] == [
        None,
        None,
        {"trace-id": "t1", "source": "web"},
        None,
    ]


def test_starts_where_asked_and_stops_at_stop_at_seq(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 300)

    async def work(source: JetStreamSource) -> tuple[list[int], list[int]]:
        stopped = seqs(await collect(source, 50, stop_at_seq=120))
        beyond = seqs(await collect(source, 301))
        return stopped, beyond

    stopped, beyond = with_source(any_nats_server, stream_name, stream_name, work, "batch_size=16")
    assert stopped == list(range(50, 121))
    assert beyond == []


def test_max_messages_trims_the_last_batch(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 500)

    async def work(source: JetStreamSource) -> list[list[int]]:
        return [
            seqs(await collect(source, 1, max_messages=1)),
            seqs(await collect(source, 10, max_messages=250)),
        ]

    one, many = with_source(any_nats_server, stream_name, stream_name, work, "batch_size=100")
    assert one == [1]
    assert many == list(range(10, 260))


def test_start_time_starts_at_the_first_message_stored_after_it(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [f"{stream_name}.>"])
    pub.publish_orders(f"{stream_name}.a", 20)
    time.sleep(0.05)
    moment = datetime.now(timezone.utc)
    time.sleep(0.05)
    pub.publish_orders(f"{stream_name}.b", 5)
    later = pub.publish_orders(f"{stream_name}.a", 20)

    async def work(source: JetStreamSource) -> list[int]:
        return seqs(await collect(source, 1, start_time=moment))

    assert with_source(any_nats_server, stream_name, f"{stream_name}.a", work) == later


def test_nothing_pending_returns_at_once(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [f"{stream_name}.>"])
    pub.publish_orders(f"{stream_name}.other", 5)

    async def work(source: JetStreamSource) -> tuple[list[int], float]:
        began = time.monotonic()
        got = seqs(await collect(source, 1))
        return got, time.monotonic() - began

    got, seconds = with_source(any_nats_server, stream_name, f"{stream_name}.a", work, "timeout=10")
    assert got == []
    assert seconds < 1


def test_pulls_stay_in_flight_while_the_caller_works(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    """While the caller handles a batch, the next pulls keep arriving: after a pause, what has
    arrived comes back as one batch, bigger than several pulls."""
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 3000)

    async def work(source: JetStreamSource) -> list[int]:
        sizes = []
        async for batch in source.messages(1):
            sizes.append(len(batch))
            if len(sizes) == 1:
                await asyncio.sleep(0.5)
        return sizes

    sizes = with_source(any_nats_server, stream_name, stream_name, work, "batch_size=50")
    assert sum(sizes) == 3000
    # Several pulls of 50 were answered during the pause and come back together.
    assert sizes[1] > 2 * 50


def test_ephemeral_consumers_are_deleted_afterwards(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 50)

    async def work(source: JetStreamSource) -> list[str]:
        async for _ in source.messages(1, max_messages=10):
            break  # leave the generator open: the source still cleans up
        assert source.spec.durable is None
        await source.pending_after(3)
        await source.last_message_time()
        return await consumer_names(any_nats_server.url, stream_name)

    during = with_source(any_nats_server, stream_name, stream_name, work)
    assert len(during) <= 1
    assert asyncio.run(consumer_names(any_nats_server.url, stream_name)) == []


@pytest.mark.parametrize("timeout", ["0.5", "2"])  # without heartbeats, and with them
def test_a_consumer_deleted_mid_pull_is_recreated_after_the_last_yielded(
    any_nats_server: LocalNatsServer, stream_name: str, timeout: str
) -> None:
    """What happens when the server reaps an ephemeral consumer during a slow commit."""
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    published = pub.publish_orders(stream_name, 2000)

    async def work(source: JetStreamSource) -> list[int]:
        got: list[int] = []
        deleted = False
        async for batch in source.messages(1):
            got.extend(batch.sequences)
            if not deleted:
                deleted = True
                nc = await nats.connect(any_nats_server.url)
                for name in await consumer_names(any_nats_server.url, stream_name):
                    await nc.jetstream().delete_consumer(stream_name, name)
                await nc.close()
        return got

    got = with_source(
        any_nats_server, stream_name, stream_name, work, f"batch_size=20&timeout={timeout}"
    )
    assert got == published


def test_bulk_puller_on_a_consumer_of_its_own(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 1000)

    async def go() -> tuple[list[int], MessageBatch]:
        nc = await nats.connect(any_nats_server.url)
        js = nc.jetstream()
        info = await js.add_consumer(
            stream_name, name="bench", ack_policy="none", inactive_threshold=30.0
        )
        puller = await BulkPuller(
            nc, stream_name, info.name, batch_size=64, expires=1.0, after_seq=500
        ).start()
        got: list[int] = []
        while True:
            batch = await puller.next_batch()
            got.extend(batch.sequences)
            if not batch or batch.num_pending == 0:
                break
        # Everything was read: the next pull waits out its expiry and comes back empty.
        empty = await puller.next_batch()
        await puller.stop()
        await nc.close()
        return got, empty

    got, empty = asyncio.run(go())
    assert got == list(range(501, 1001))  # at or below after_seq: dropped
    assert len(empty) == 0


def test_bulk_puller_on_a_connection_that_just_closed_is_interrupted_not_crashed(
    nats_server: LocalNatsServer, stream_name: str
) -> None:
    # A rolling restart can close the connection between the consumer's creation and the
    # puller's subscription: the source must see an interruption it recovers from, not
    # nats-py's own error (which ended a run in CI).
    pub = Publisher(nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 10)

    async def go() -> PullInterrupted:
        nc = await nats.connect(nats_server.url)
        info = await nc.jetstream().add_consumer(
            stream_name, name="gone", ack_policy="none", inactive_threshold=30.0
        )
        await nc.close()
        puller = BulkPuller(nc, stream_name, info.name, batch_size=5, expires=1.0)
        with pytest.raises(PullInterrupted) as caught:
            await puller.start()
        return caught.value

    interrupted = asyncio.run(go())
    assert interrupted.connection_lost and interrupted.retryable


def test_parse_ack_reply_v1_and_v2() -> None:
    v1 = parse_ack_reply("$JS.ACK.ORDERS.c1.1.42.7.1700000000123456789.5")
    assert (v1.stream, v1.consumer, v1.stream_seq, v1.consumer_seq) == ("ORDERS", "c1", 42, 7)
    assert (v1.timestamp_ns, v1.pending, v1.delivered, v1.domain) == (
        1700000000123456789,
        5,
        1,
        None,
    )
    v2 = parse_ack_reply("$JS.ACK.hub.ACCHASH.ORDERS.c1.2.42.7.1700000000123456789.5.tok")
    assert (v2.domain, v2.stream, v2.stream_seq, v2.delivered, v2.pending) == (
        "hub",
        "ORDERS",
        42,
        2,
        5,
    )
    v2_no_domain = parse_ack_reply("$JS.ACK._.ACCHASH.ORDERS.c1.1.42.7.1700000000123456789.5")
    assert v2_no_domain.domain is None
    assert v2_no_domain.stream_seq == 42
    with pytest.raises(ValueError):
        parse_ack_reply("_INBOX.abc")


def test_bulk_puller_drops_redeliveries(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    """Unacked messages come back after ack_wait, ahead of new ones: never yielded twice."""
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 50)

    async def go() -> tuple[list[int], int]:
        nc = await nats.connect(any_nats_server.url)
        await nc.jetstream().add_consumer(
            stream_name, durable_name="redo", ack_policy="explicit", ack_wait=0.5
        )
        puller = await BulkPuller(nc, stream_name, "redo", batch_size=20, expires=1.0).start()
        got = list((await puller.next_batch(20)).sequences)
        await asyncio.sleep(1.2)  # past ack_wait: 1..20 are due again
        while len(got) < 50:
            batch = await puller.next_batch()
            if not batch:
                break
            got.extend(batch.sequences)
        await puller.stop()
        await nc.close()
        return got, puller.duplicates

    got, duplicates = asyncio.run(go())
    assert got == list(range(1, 51))
    assert duplicates > 0


def testack_fields_in_bulk_and_one_by_one_agree() -> None:
    v1 = [b"$JS.ACK.S.c.1.%d.%d.17000000%d.%d" % (i, i, i, 9 - i) for i in range(1, 4)]
    v2 = [b"$JS.ACK._.HASH.S.c.1.%d.%d.17000000%d.%d.tok" % (i, i, i, 9 - i) for i in range(4, 6)]
    assert ack_fields(v1, 9) == ack_fields_each(v1)
    assert ack_fields(v2, 12) == ack_fields_each(v2)
    assert ack_fields(v1 + v2, 9) is None  # mixed forms: read one by one
    seqs, cseqs, times, pending = ack_fields_each(v1 + v2)
    assert (seqs, pending) == ([b"1", b"2", b"3", b"4", b"5"], [b"8", b"7", b"6", b"5", b"4"])
    assert cseqs == seqs and times[-1] == b"170000005"
