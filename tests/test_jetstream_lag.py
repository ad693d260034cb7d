"""Stream state, pending counts, newest message time, gaps and recreated streams (2.15 and 2.9)."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import TypeVar

import nats
from conftest import Publisher

from nilus_dagster.jetstream import JetStreamSource, StreamState
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest.address import parse_nats_address

T = TypeVar("T")


def with_source(
    server: LocalNatsServer,
    stream: str,
    subject: str,
    work: Callable[[JetStreamSource], Awaitable[T]],
) -> T:
    addr = parse_nats_address(f"nats+jetstream://{server.hostport}?subject={subject}")

    async def go() -> T:
        async with JetStreamSource(addr, stream) as source:
            return await work(source)

    return asyncio.run(go())


def state_of(server: LocalNatsServer, stream: str, subject: str) -> StreamState:
    async def work(source: JetStreamSource) -> StreamState:
        return await source.stream_state()

    return with_source(server, stream, subject, work)


def test_stream_state(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    pub = Publisher(any_nats_server.url)
    before = datetime.now(timezone.utc)
    pub.create_stream(stream_name, [f"{stream_name}.a", f"{stream_name}.b.>"])
    pub.publish_orders(f"{stream_name}.a", 7)
    pub.publish_orders(f"{stream_name}.b.x", 3)
    state = state_of(any_nats_server, stream_name, f"{stream_name}.a")
    assert (state.name, state.first_seq, state.last_seq, state.messages) == (stream_name, 1, 10, 10)
    assert state.subjects == (f"{stream_name}.a", f"{stream_name}.b.>")
    assert state.created.tzinfo is not None
    assert before - timedelta(seconds=2) < state.created < datetime.now(timezone.utc)
    # The creation time reads the same every time (it is compared across runs).
    assert state_of(any_nats_server, stream_name, f"{stream_name}.a").created == state.created


def test_pending_after_counts_the_subject_only(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [f"{stream_name}.>"])
    a1 = pub.publish_orders(f"{stream_name}.a", 10)
    pub.publish_orders(f"{stream_name}.b", 10)
    a2 = pub.publish_orders(f"{stream_name}.a", 5)
    positions = [0, a1[3], a1[-1], a2[0], a2[-1], a2[-1] + 100]

    async def work(source: JetStreamSource) -> list[int]:
        return [await source.pending_after(p) for p in positions]

    counts = with_source(any_nats_server, stream_name, f"{stream_name}.a", work)
    assert counts == [15, 11, 5, 4, 0, 0]
    # The probes leave no consumer behind.
    assert asyncio.run(_consumer_count(any_nats_server.url, stream_name)) == 0


async def _consumer_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return len(await nc.jetstream().consumers_info(stream))
    finally:
        await nc.close()


def test_last_message_time(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [f"{stream_name}.>"])
    pub.publish_orders(f"{stream_name}.a.one", 3)
    time.sleep(0.05)
    before = datetime.now(timezone.utc)
    pub.publish_orders(f"{stream_name}.a.two", 1)
    after = datetime.now(timezone.utc)
    time.sleep(0.05)
    pub.publish_orders(f"{stream_name}.b", 1)

    async def work(source: JetStreamSource) -> datetime | None:
        return await source.last_message_time()

    for subject in (f"{stream_name}.a.two", f"{stream_name}.a.*", f"{stream_name}.a.>"):
        newest = with_source(any_nats_server, stream_name, subject, work)
        assert newest is not None
        assert before - timedelta(milliseconds=5) <= newest <= after + timedelta(milliseconds=5)
    assert with_source(any_nats_server, stream_name, f"{stream_name}.c", work) is None


def test_gap_after_a_purge(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 20)
    pub.purge(stream_name, seq=15)  # keeps 15..20
    state = state_of(any_nats_server, stream_name, stream_name)
    assert state.first_seq == 15
    assert state.gap_after(10) == 4  # 11..14 are gone
    assert state.gap_after(14) == 0
    assert state.gap_after(17) == 0
    assert state.gap_after(0) == 0  # nothing committed yet: no gap to speak of
    assert state.recreated_since(17) is None


def test_recreated_stream_is_recognised(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    pub = Publisher(any_nats_server.url)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 20)
    old = state_of(any_nats_server, stream_name, stream_name)
    assert old.recreated_since(20, old.created) is None
    pub.delete_stream(stream_name)
    time.sleep(0.01)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 30)
    new = state_of(any_nats_server, stream_name, stream_name)
    assert new.created > old.created
    why = new.recreated_since(20, old.created)
    assert why is not None and "deleted and recreated" in why
    # Without a stored creation time, a position past the end still gives it away.
    pub.delete_stream(stream_name)
    pub.create_stream(stream_name, [stream_name])
    pub.publish_orders(stream_name, 5)
    shorter = state_of(any_nats_server, stream_name, stream_name)
    assert "ends at sequence 5, before the committed position 20" in (
        shorter.recreated_since(20) or ""
    )
