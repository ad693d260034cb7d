"""A server killed, stopped or frozen during a pull: every sequence exactly once, in order, or a
clear error once the recovery budget is spent."""

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from conftest import Publisher

from nilus_dagster.errors import PositionError, SourceError
from nilus_dagster.jetstream import JetStreamSource
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest.address import parse_nats_address

STREAM = "ORDERS"
SUBJECT = "orders.created"


def server_with_orders(
    factory: Callable[..., LocalNatsServer], nats_binary: str | None, count: int
) -> tuple[LocalNatsServer, list[int]]:
    """A server of its own (it gets killed) with ``count`` orders, other subjects in between."""
    server = factory(binary=nats_binary)
    pub = Publisher(server.url)
    pub.create_stream(STREAM, ["orders.>"])
    published: list[int] = []
    for start in range(0, count, 2000):
        published += pub.publish_orders(SUBJECT, 2000, start=start)
        pub.publish_orders("orders.other", 10)
    return server, published


def in_background(*steps: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=lambda: [step() for step in steps], daemon=True)
    thread.start()
    return thread


def pull_with_fault(
    server: LocalNatsServer,
    fault: Callable[[], object],
    *,
    fault_after: int,
    options: str = "",
    **kwargs: object,
) -> tuple[list[int], JetStreamSource]:
    """Pull everything, a little slowly, and set off ``fault`` once ``fault_after`` messages
    are in; the pull goes on meanwhile."""
    addr = parse_nats_address(
        f"nats+jetstream://{server.hostport}?subject={SUBJECT}&batch_size=100&timeout=2{options}"
    )
    source = JetStreamSource(addr, STREAM, reconnect_time_wait=0.2, **kwargs)  # type: ignore[arg-type]

    async def go() -> list[int]:
        got: list[int] = []
        faulted = False
        async with source:
            async for batch in source.messages(1):
                got.extend(batch.sequences)
                if not faulted and len(got) >= fault_after:
                    faulted = True
                    fault()
                await asyncio.sleep(0.002)
        return got

    return asyncio.run(go()), source


def test_sigkill_and_restart_mid_pull(
    nats_server_factory: Callable[..., LocalNatsServer], nats_binary: str | None
) -> None:
    server, published = server_with_orders(nats_server_factory, nats_binary, 20_000)
    thread: list[threading.Thread] = []

    def kill_and_restart() -> None:
        server.kill()  # SIGKILL: no goodbye to the client, store kept as it is
        thread.append(in_background(lambda: time.sleep(1.0), server.start))

    got, source = pull_with_fault(server, kill_and_restart, fault_after=5000)
    thread[0].join()
    assert got == published  # every sequence exactly once, in order
    assert source.reconnects >= 1


def test_durable_survives_a_restart(nats_server_factory: Callable[..., LocalNatsServer]) -> None:
    server, published = server_with_orders(nats_server_factory, None, 10_000)
    thread: list[threading.Thread] = []

    def kill_and_restart() -> None:
        server.kill()
        thread.append(in_background(lambda: time.sleep(0.5), server.start))

    got, source = pull_with_fault(
        server, kill_and_restart, fault_after=3000, options="&durable=ingest"
    )
    thread[0].join()
    assert got == published
    assert source.spec.durable == "ingest"


def test_server_gone_for_good_is_a_clear_error(
    nats_server_factory: Callable[..., LocalNatsServer],
) -> None:
    # Far more than the pulls in flight, so the kill lands while messages are still to come.
    server, _ = server_with_orders(nats_server_factory, None, 12_000)
    began: list[float] = []

    def kill() -> None:
        began.append(time.monotonic())
        server.kill()

    with pytest.raises(SourceError) as caught:
        pull_with_fault(server, kill, fault_after=1000, failover_timeout=2.0)
    seconds = time.monotonic() - began[0]
    message = str(caught.value)
    assert message.startswith(
        f"could not resume pulling from stream {STREAM} at {server.hostport} "
        "within 2s (failover_timeout): "
    )
    assert f"cannot reach NATS at {server.hostport}" in message
    assert 2 <= seconds < 5


@pytest.mark.parametrize("frozen_for", [3.5, 6.0])
def test_frozen_server_is_waited_out(
    nats_server_factory: Callable[..., LocalNatsServer],
    caplog: pytest.LogCaptureFixture,
    frozen_for: float,
) -> None:
    """SIGSTOP: the connection stays up but nothing answers; heartbeats stop, the pull notices,
    and carries on once the server wakes up (over a new connection if it slept long)."""
    server, published = server_with_orders(nats_server_factory, None, 10_000)
    thread: list[threading.Thread] = []

    def freeze() -> None:
        server.pause()
        thread.append(in_background(lambda: time.sleep(frozen_for), server.resume))

    with caplog.at_level("INFO", logger="nilus_dagster.jetstream"):
        got, source = pull_with_fault(
            server, freeze, fault_after=2000, failover_timeout=20.0, connect_timeout=1.0
        )
    thread[0].join()
    assert got == published
    assert "no message or heartbeat from consumer" in caplog.text
    assert "pull resumed after" in caplog.text
    if frozen_for > 5:
        assert "does not answer; reconnecting" in caplog.text
        assert source.reconnects >= 1


def test_stream_recreated_mid_pull_is_refused(
    nats_server_factory: Callable[..., LocalNatsServer],
) -> None:
    """A recreated stream numbers from 1 again: its messages must not pass for the old one's."""
    server, _ = server_with_orders(nats_server_factory, None, 12_000)

    def recreate() -> None:
        pub = Publisher(server.url)
        pub.delete_stream(STREAM)
        pub.create_stream(STREAM, ["orders.>"])
        pub.publish_orders(SUBJECT, 20_000)

    with pytest.raises(PositionError) as caught:
        pull_with_fault(server, lambda: in_background(recreate).join(), fault_after=1000)
    assert f"stream {STREAM} was deleted and recreated while this run was reading it" in str(
        caught.value
    )
