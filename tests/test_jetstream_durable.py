"""Durable consumers: created, left alone when in place, realigned when ahead or behind, moved
after each commit; never read from, so another client pulling from one takes nothing."""

import asyncio
import json
from typing import Any

import nats
import pytest
from conftest import Publisher

from nilus_dagster.jetstream import JetStreamSource
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest.address import parse_nats_address


def source(server: LocalNatsServer, stream: str, options: str) -> JetStreamSource:
    addr = parse_nats_address(
        f"nats+jetstream://{server.hostport}?subject={stream}.orders&{options}"
    )
    return JetStreamSource(addr, stream)


def read(
    server: LocalNatsServer,
    stream: str,
    options: str,
    start: int,
    *,
    committed: int | None = None,
    **kwargs: Any,
) -> tuple[list[int], bool, list[str]]:
    """One session as a run does it: (sequences read, realigned, reasons)."""

    async def go() -> tuple[list[int], bool, list[str]]:
        got: list[int] = []
        async with source(server, stream, options) as src:
            assert src.spec.durable == f"{stream}d"
            await src.align_durable(start)
            async for batch in src.messages(start, **kwargs):
                got.extend(batch.sequences)
            if committed is not None:
                await src.mark_committed(committed)
            return got, src.realigned, src.realign_reasons

    return asyncio.run(go())


def info(server: LocalNatsServer, stream: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        nc = await nats.connect(server.url)
        try:
            msg = await nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{stream}d", b"", timeout=2)
            return json.loads(msg.data)
        finally:
            await nc.close()

    return asyncio.run(go())


def orders(server: LocalNatsServer, stream: str, count: int = 100) -> list[int]:
    pub = Publisher(server.url)
    pub.create_stream(stream, [f"{stream}.>"])
    seqs = []
    for i in range(count // 10):
        seqs += pub.publish_orders(f"{stream}.orders", 10, start=i * 10)
        pub.publish_orders(f"{stream}.other", 1)
    return seqs


def is_29(server: LocalNatsServer) -> bool:
    return server.binary.endswith("/usr/sbin/nats-server")


def at(server: LocalNatsServer, stream: str, seq: int) -> bool:
    """Whether the durable stands right after ``seq`` with nothing unacknowledged."""
    state = info(server, stream)
    # 2.9 recreates the durable to move it, and a new consumer's ack floor starts at 0.
    floor = 0 if is_29(server) else seq
    return (
        state["delivered"]["stream_seq"],
        state["ack_floor"]["stream_seq"],
        state["num_ack_pending"],
    ) == (seq, floor, 0)


def test_created_then_left_in_place(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d&batch_size=7"
    got, realigned, _ = read(
        any_nats_server, stream_name, options, 1, max_messages=50, committed=seqs[49]
    )
    assert got == seqs[:50]
    assert not realigned
    created = info(any_nats_server, stream_name)
    assert created["config"]["durable_name"] == f"{stream_name}d"
    assert created["config"]["filter_subject"] == f"{stream_name}.orders"
    assert created["config"]["ack_policy"] == "none"
    assert at(any_nats_server, stream_name, seqs[49])
    assert created["num_pending"] == 50
    # The next session starts right after: the durable is already there.
    got, realigned, _ = read(any_nats_server, stream_name, options, seqs[49] + 1)
    assert got == seqs[50:]
    assert not realigned
    assert info(any_nats_server, stream_name)["created"] == created["created"]


def test_messages_never_come_from_the_durable(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    """Another client pulling from the durable (a second run, a stray `nats consumer next`)
    while a run reads takes nothing from the run; so does another run moving the durable."""
    seqs = orders(any_nats_server, stream_name, 3_000)
    options = f"durable={stream_name}d&batch_size=10"
    stolen: list[int] = []
    rounds = 0

    async def go() -> list[int]:
        nonlocal rounds
        got: list[int] = []
        nc = await nats.connect(any_nats_server.url)
        rogue = await nc.jetstream().pull_subscribe_bind(f"{stream_name}d", stream=stream_name)
        try:
            async with source(any_nats_server, stream_name, options) as src:
                await src.align_durable(1)
                async for batch in src.messages(1):
                    got.extend(batch.sequences)
                    if len(got) < len(seqs):
                        rounds += 1
                        for msg in await rogue.fetch(50, timeout=1):
                            stolen.append(msg.metadata.sequence.stream)
                        # A second run moving the durable back and forth (2.14+: a reset
                        # restarts its delivery numbering; 2.9: a new consumer).
                        await src.mark_committed(seqs[rounds % len(seqs)])
        finally:
            await nc.close()
        return got

    assert asyncio.run(go()) == seqs
    assert rounds >= 2, rounds  # the run was interleaved with the other clients
    assert stolen  # the durable did deliver to the other client


def test_realigned_when_ahead(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d"
    assert read(any_nats_server, stream_name, options, 1, committed=seqs[-1])[0] == seqs
    before = info(any_nats_server, stream_name)
    # The table only holds the first 40 (say its commits were lost): read again from there.
    got, realigned, reasons = read(any_nats_server, stream_name, options, seqs[39] + 1)
    assert got == seqs[40:]
    assert realigned
    assert reasons == [
        f"it is ahead: its next sequence is {seqs[-1] + 1}, the table needs {seqs[39] + 1}"
    ]
    after = info(any_nats_server, stream_name)
    assert at(any_nats_server, stream_name, seqs[39])
    if is_29(any_nats_server):
        assert after["created"] != before["created"]  # 2.9: deleted and recreated
    else:
        assert after["created"] == before["created"]  # 2.14+: reset in place


def test_realigned_when_behind(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d&batch_size=10"
    got = read(any_nats_server, stream_name, options, 1, max_messages=20, committed=seqs[19])[0]
    assert got == seqs[:20]
    assert info(any_nats_server, stream_name)["delivered"]["stream_seq"] == seqs[19]
    got, realigned, reasons = read(any_nats_server, stream_name, options, seqs[59] + 1)
    assert got == seqs[60:]
    assert realigned
    assert reasons == [
        f"it is behind: its next sequence is {seqs[19] + 1}, the table needs {seqs[59] + 1}"
    ]


def test_not_realigned_when_only_other_subjects_lie_between(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    seqs = orders(any_nats_server, stream_name, 20)
    options = f"durable={stream_name}d"
    read(any_nats_server, stream_name, options, 1, max_messages=10, committed=seqs[9])
    # seqs[9] + 1 holds the other subject's message: starting after it reads the same.
    got, realigned, _ = read(any_nats_server, stream_name, options, seqs[9] + 2)
    assert got == seqs[10:]
    assert not realigned


def test_realigned_when_it_filters_another_subject(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    seqs = orders(any_nats_server, stream_name, 20)

    async def other_durable() -> None:
        nc = await nats.connect(any_nats_server.url)
        await nc.jetstream().add_consumer(
            stream_name,
            durable_name=f"{stream_name}d",
            filter_subject=f"{stream_name}.other",
            ack_policy="none",
        )
        await nc.close()

    asyncio.run(other_durable())
    got, realigned, reasons = read(any_nats_server, stream_name, f"durable={stream_name}d", 1)
    assert got == seqs
    assert realigned
    assert reasons == [f"it filters on '{stream_name}.other', not '{stream_name}.orders'"]
    assert info(any_nats_server, stream_name)["config"]["filter_subject"] == (
        f"{stream_name}.orders"
    )


@pytest.mark.parametrize("policy", ["none", "all", "explicit"])
def test_mark_committed_moves_the_durable(
    any_nats_server: LocalNatsServer, stream_name: str, policy: str
) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d&ack_policy={policy}&batch_size=10"
    got, _, _ = read(any_nats_server, stream_name, options, 1, committed=seqs[59])
    assert got == seqs
    state = info(any_nats_server, stream_name)
    assert state["config"]["ack_policy"] == policy
    # What `nats consumer info` shows is the table's position, whatever was read beyond it.
    assert at(any_nats_server, stream_name, seqs[59])
    assert state["num_pending"] == 40
    got, realigned, _ = read(any_nats_server, stream_name, options, seqs[59] + 1)
    assert (got, realigned) == (seqs[60:], False)


def test_mark_committed_recreates_a_deleted_durable(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    seqs = orders(any_nats_server, stream_name, 20)
    options = f"durable={stream_name}d"

    async def go() -> None:
        nc = await nats.connect(any_nats_server.url)
        async with source(any_nats_server, stream_name, options) as src:
            await src.align_durable(1)
            await nc.jetstream().delete_consumer(stream_name, f"{stream_name}d")
            await src.mark_committed(seqs[4])
        await nc.close()

    asyncio.run(go())
    assert at(any_nats_server, stream_name, seqs[4])


def test_no_durable_means_nothing_to_align(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    seqs = orders(any_nats_server, stream_name, 10)

    async def go() -> tuple[list[int], list[str]]:
        got: list[int] = []
        async with source(any_nats_server, stream_name, "batch_size=5") as src:
            await src.align_durable(1)
            async for batch in src.messages(1):
                got.extend(batch.sequences)
            await src.mark_committed(got[-1])
            return got, [c async for c in _consumers(src)]

    got, consumers = asyncio.run(go())
    assert got == seqs
    assert consumers == []


async def _consumers(src: JetStreamSource) -> Any:
    link = await src._session.ensure()
    listing = await link.api(f"$JS.API.CONSUMER.NAMES.{src.stream}")
    for name in listing.get("consumers") or []:
        yield name


def test_a_durable_made_by_another_run_meanwhile_is_replaced(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    """Two runs on 2.9 move the durable by delete and create: one run's create can find the
    other's durable, made at another start ("start sequence can not be updated")."""
    seqs = orders(any_nats_server, stream_name, 20)
    options = f"durable={stream_name}d"

    async def go() -> None:
        async with source(any_nats_server, stream_name, options) as src:
            await src.align_durable(1)  # the other run's durable, at 1
            link = await src._session.ensure()
            await src._durable.recreate(link, seqs[4] + 1, exists=False)

    asyncio.run(go())
    assert at(any_nats_server, stream_name, seqs[4])
