"""Which failures a source retries: decided by the error's type and attributes, not its text."""

import asyncio

import pytest
from conftest import Publisher
from nats.js.api import ConsumerInfo

from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream import admin
from nilus_dagster.jetstream.connection import Link, connect, server_urls
from nilus_dagster.jetstream.consumers import ConsumerSpec, durable_config, misalignment
from nilus_dagster.jetstream.errors import ERR_STREAM_NOT_FOUND, JsApiError
from nilus_dagster.jetstream.local_server import LocalNatsServer, free_port
from nilus_dagster.manifest.address import parse_nats_address


async def _link(address_text: str) -> Link:
    address = parse_nats_address(address_text)
    return await connect(
        address, server_urls(address), connect_timeout=2, request_timeout=2, name="t"
    )


def test_an_unreachable_server_is_retryable() -> None:
    with pytest.raises(SourceError) as caught:
        asyncio.run(_link(f"nats+jetstream://127.0.0.1:{free_port()}?subject=a.b"))
    assert str(caught.value).startswith("cannot reach NATS")
    assert caught.value.retryable


def test_api_errors_carry_their_code_and_retryability(nats_server: LocalNatsServer) -> None:
    async def go() -> JsApiError:
        link = await _link(f"nats+jetstream://{nats_server.hostport}?subject=a.b")
        try:
            with pytest.raises(JsApiError) as caught:
                await admin.stream_info(link, "NO_SUCH_STREAM")
            return caught.value
        finally:
            await link.close()

    missing = asyncio.run(go())
    assert missing.err_code == ERR_STREAM_NOT_FOUND
    assert not missing.retryable


def test_a_misaligned_durable_says_whether_only_its_position_differs(
    nats_server: LocalNatsServer, publisher: Publisher, stream_name: str
) -> None:
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    publisher.publish_orders(subject, 5)
    spec = ConsumerSpec(stream=stream_name, subject=subject, durable=f"{stream_name}d")

    async def go() -> ConsumerInfo:
        link = await _link(f"nats+jetstream://{nats_server.hostport}?subject={subject}")
        try:
            await admin.create_consumer(link, stream_name, durable_config(spec, 3))
            return await admin.consumer_info(link, stream_name, spec.durable or "")
        finally:
            await link.close()

    info = asyncio.run(go())
    assert misalignment(info, spec, 3) is None
    ahead = misalignment(info, spec, 1)
    behind = misalignment(info, spec, 5)
    assert ahead is not None and ahead.position_only
    assert str(ahead) == "it is ahead: its next sequence is 3, the table needs 1"
    assert behind is not None and behind.position_only
    other = ConsumerSpec(stream=stream_name, subject=f"{stream_name}.other", durable=spec.durable)
    wrong_filter = misalignment(info, other, 3)
    assert wrong_filter is not None and not wrong_filter.position_only
    assert wrong_filter.reason.startswith("it filters on")
