"""Durable consumers: created, attached, realigned when ahead or behind, acked after commit."""

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
    ack_through: int | None = None,
    **kwargs: Any,
) -> tuple[list[int], bool, list[str]]:
    """One session: (sequences read, realigned, reasons)."""

    async def go() -> tuple[list[int], bool, list[str]]:
        got: list[int] = []
        async with source(server, stream, options) as src:
            assert src.consumer_kind == f"durable:{stream}d"
            async for batch in src.messages(start, **kwargs):
                got.extend(batch.sequences)
            if ack_through is not None:
                await src.ack_through(ack_through)
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


def test_created_then_attached(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d&batch_size=7"
    got, realigned, _ = read(any_nats_server, stream_name, options, 1, max_messages=50)
    assert got == seqs[:50]
    assert not realigned
    created = info(any_nats_server, stream_name)
    assert created["config"]["durable_name"] == f"{stream_name}d"
    assert created["config"]["filter_subject"] == f"{stream_name}.orders"
    assert created["config"]["ack_policy"] == "none"
    assert created["delivered"]["stream_seq"] == seqs[49]
    # The next session starts right after: the durable is used as it is.
    got, realigned, _ = read(any_nats_server, stream_name, options, seqs[49] + 1)
    assert got == seqs[50:]
    assert not realigned
    assert info(any_nats_server, stream_name)["created"] == created["created"]


def test_realigned_when_ahead(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d"
    assert read(any_nats_server, stream_name, options, 1)[0] == seqs
    before = info(any_nats_server, stream_name)
    # The table only holds the first 40 (say a commit was lost): read again from there.
    got, realigned, reasons = read(any_nats_server, stream_name, options, seqs[39] + 1)
    assert got == seqs[40:]
    assert realigned
    # (2.9 moves a filtered consumer past the other subject's last message too.)
    assert reasons[0].startswith("it is ahead: its next sequence is 1")
    assert reasons[0].endswith(f", the table needs {seqs[39] + 1}")
    after = info(any_nats_server, stream_name)
    assert seqs[-1] <= after["delivered"]["stream_seq"] <= seqs[-1] + 1
    if any_nats_server.binary.endswith("/usr/sbin/nats-server"):
        assert after["created"] != before["created"]  # 2.9: deleted and recreated
    else:
        assert after["created"] == before["created"]  # 2.14+: reset in place


def test_realigned_when_behind(any_nats_server: LocalNatsServer, stream_name: str) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d&batch_size=10"
    assert read(any_nats_server, stream_name, options, 1, max_messages=20)[0] == seqs[:20]
    assert info(any_nats_server, stream_name)["delivered"]["stream_seq"] == seqs[19]
    got, realigned, reasons = read(any_nats_server, stream_name, options, seqs[59] + 1)
    assert got == seqs[60:]
    assert realigned
    assert reasons[0].startswith(f"it is behind: its next sequence is {seqs[19] + 1}")


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


@pytest.mark.parametrize("policy", ["all", "explicit"])
def test_ack_through_moves_the_ack_floor(
    any_nats_server: LocalNatsServer, stream_name: str, policy: str
) -> None:
    seqs = orders(any_nats_server, stream_name)
    options = f"durable={stream_name}d&ack_policy={policy}&batch_size=10"
    got, _, _ = read(any_nats_server, stream_name, options, 1, ack_through=seqs[59])
    assert got == seqs
    state = info(any_nats_server, stream_name)
    assert state["config"]["ack_policy"] == policy
    # The floor may move on over the other subject's message that follows.
    assert seqs[59] <= state["ack_floor"]["stream_seq"] < seqs[60]
    assert state["num_ack_pending"] == 40
    # Unacked messages would come back after newer ones: the next session realigns, in order.
    got, realigned, reasons = read(
        any_nats_server, stream_name, options, seqs[59] + 1, ack_through=seqs[-1]
    )
    assert got == seqs[60:]
    assert realigned
    assert reasons == ["it has 40 delivered but unacknowledged messages"]
    state = info(any_nats_server, stream_name)
    assert seqs[-1] <= state["ack_floor"]["stream_seq"] <= seqs[-1] + 1
    assert state["num_ack_pending"] == 0
    # Everything acked: the next session attaches without realigning.
    assert read(any_nats_server, stream_name, options, seqs[-1] + 1)[:2] == ([], False)


def test_ack_through_is_a_no_op_without_an_ack_policy(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    orders(any_nats_server, stream_name, 10)
    options = f"durable={stream_name}d"
    got, _, _ = read(any_nats_server, stream_name, options, 1, ack_through=5)
    assert len(got) == 10
    assert info(any_nats_server, stream_name)["num_ack_pending"] == 0
