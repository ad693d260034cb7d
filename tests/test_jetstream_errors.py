"""The Nilus troubleshooting symptoms, turned into their resolutions, on both server versions.

Missing stream, subject not bound to the stream, JetStream off (server or account), permission
refusals (JetStream API, subject, reply inboxes, pulls) and a server that drops a consumer
setting. Each failure is checked for its words and for how long it took.
"""

import asyncio
import os
import time
from collections.abc import Callable

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream import JetStreamSource
from nilus_dagster.jetstream.consumers import verify_created
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest.address import parse_nats_address

PASSWORD = "perm-Secret-Zk4"
SUBJECT = "orders.created"


def source_error(
    hostport: str, stream: str, *, subject: str = SUBJECT, user: str = "", pull: bool = False
) -> tuple[str, float]:
    """Check the stream and subject (and pull when asked); return the SourceError and the time."""
    creds = f"{user}:{{NATS_PASSWORD}}@" if user else ""
    addr = parse_nats_address(f"nats+jetstream://{creds}{hostport}?subject={subject}").resolve(
        {"NATS_PASSWORD": PASSWORD}
    )

    async def go() -> None:
        async with JetStreamSource(addr, stream) as source:
            await source.stream_state()
            await source.check_subject()
            if pull:
                async for _ in source.messages(1):
                    pass

    began = time.monotonic()
    with pytest.raises(SourceError) as caught:
        asyncio.run(go())
    message = str(caught.value)
    assert PASSWORD not in message
    return message, time.monotonic() - began


async def _admin(
    url: str, stream: str, subjects: list[str], publish_to: str | None = None, **connect: object
) -> None:
    nc = await nats.connect(url, allow_reconnect=False, **connect)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=subjects)
        subject = publish_to or subjects[0].replace(">", "x").replace("*", "x")
        await js.publish(subject, b'{"i": 1}')
    finally:
        await nc.close()


def test_unknown_stream_says_create_it_or_fix_source_table(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    asyncio.run(
        _admin(any_nats_server.url, stream_name, [f"{stream_name}.>", SUBJECT + stream_name])
    )
    message, seconds = source_error(any_nats_server.hostport, "NOPE" + stream_name)
    assert message.startswith(f"no responders available for stream NOPE{stream_name}")
    assert "source_table" in message
    assert "create it" in message
    assert f"nats stream add NOPE{stream_name}" in message
    assert "streams there:" in message
    assert seconds < 2


def test_subject_not_bound_lists_the_stream_subjects(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    subjects = [f"{stream_name}.a.>", f"{stream_name}.b"]
    asyncio.run(_admin(any_nats_server.url, stream_name, [*subjects, f"{stream_name}.z"]))
    message, seconds = source_error(
        any_nats_server.hostport, stream_name, subject=f"{stream_name}.c"
    )
    assert message == (
        f"subject {stream_name}.c is not bound to stream {stream_name}: the stream's subjects "
        f"are {stream_name}.a.>, {stream_name}.b, {stream_name}.z; fix subject= in the address, "
        f"or add {stream_name}.c to the stream's subjects"
    )
    assert seconds < 2


def test_subject_under_a_wildcard_is_bound(
    any_nats_server: LocalNatsServer, stream_name: str
) -> None:
    asyncio.run(_admin(any_nats_server.url, stream_name, [f"{stream_name}.>"]))
    addr = parse_nats_address(
        f"nats+jetstream://{any_nats_server.hostport}?subject={stream_name}.x.*"
    )

    async def go() -> None:
        async with JetStreamSource(addr, stream_name) as source:
            await source.check_subject()

    asyncio.run(go())


def test_jetstream_disabled_on_the_server(
    nats_server_factory: Callable[..., LocalNatsServer], nats_binary: str | None
) -> None:
    server = nats_server_factory("jetstream: disabled", binary=nats_binary)
    message, seconds = source_error(server.hostport, "ORDERS")
    assert message.startswith(f"JetStream is not enabled at {server.hostport}")
    assert "start nats-server with -js" in message
    assert seconds < 2


def test_jetstream_disabled_for_the_account(
    nats_server_factory: Callable[..., LocalNatsServer], nats_binary: str | None
) -> None:
    server = nats_server_factory(
        f'accounts {{ APP: {{ users: [ {{ user: app, password: "{PASSWORD}" }} ] }} }}',
        binary=nats_binary,
    )
    message, seconds = source_error(server.hostport, "ORDERS", user="app")
    assert message.startswith(f"JetStream is not enabled for this account at {server.hostport}")
    assert seconds < 2


PERMISSIONS = f"""
authorization {{
  users = [
    {{ user: admin, password: "{PASSWORD}" }}
    {{ user: noapi, password: "{PASSWORD}",
       permissions: {{ publish: {{ deny: ["$JS.API.STREAM.INFO.>"] }} }} }}
    {{ user: nosub, password: "{PASSWORD}",
       permissions: {{ subscribe: {{ deny: ["orders.>"] }} }} }}
    {{ user: noinbox, password: "{PASSWORD}",
       permissions: {{ subscribe: {{ deny: ["_INBOX.>"] }} }} }}
    {{ user: nopull, password: "{PASSWORD}",
       permissions: {{ publish: {{ deny: ["$JS.API.CONSUMER.MSG.NEXT.>"] }} }} }}
  ]
}}
"""


@pytest.fixture
def guarded(
    nats_server_factory: Callable[..., LocalNatsServer], nats_binary: str | None
) -> LocalNatsServer:
    """A server whose users each lack one permission, with stream ORDERS holding a message."""
    server = nats_server_factory(PERMISSIONS, binary=nats_binary)
    asyncio.run(
        _admin(server.url, "ORDERS", ["orders.>"], SUBJECT, user="admin", password=PASSWORD)
    )
    return server


def test_permission_for_the_jetstream_api(guarded: LocalNatsServer) -> None:
    message, seconds = source_error(guarded.hostport, "ORDERS", user="noapi")
    assert message.startswith(
        "permissions violation: the NATS user may not use the JetStream API on stream ORDERS "
        "(publish to $JS.API.STREAM.INFO.ORDERS was refused)"
    )
    assert "allow publish on $JS.API.STREAM.INFO.ORDERS" in message
    assert seconds < 2


def test_permission_to_subscribe_to_the_subject(guarded: LocalNatsServer) -> None:
    message, seconds = source_error(guarded.hostport, "ORDERS", user="nosub")
    assert message.startswith(
        "permissions violation: the NATS user may not subscribe to the subject orders.created: "
        "allow subscribe on orders.created"
    )
    assert seconds < 2


def test_permission_to_subscribe_to_reply_inboxes(guarded: LocalNatsServer) -> None:
    message, seconds = source_error(guarded.hostport, "ORDERS", user="noinbox")
    assert message == (
        "permissions violation: the NATS user may not subscribe to reply inboxes, where "
        "JetStream answers and pulled messages arrive: allow subscribe on _INBOX.>"
    )
    assert seconds < 2


def test_permission_to_pull(guarded: LocalNatsServer) -> None:
    message, seconds = source_error(guarded.hostport, "ORDERS", user="nopull", pull=True)
    assert message.startswith(
        "permissions violation: the NATS user may not use the JetStream API on stream ORDERS "
        "(publish to $JS.API.CONSUMER.MSG.NEXT.ORDERS."
    )
    assert seconds < 2


def test_a_dropped_consumer_setting_is_an_error(system_nats_server: LocalNatsServer) -> None:
    """nats-server 2.9 ignores filter_subjects: the config it returns must not be trusted."""
    stream = f"DROP{os.getpid()}"

    async def go() -> dict[str, object]:
        nc = await nats.connect(system_nats_server.url, allow_reconnect=False)
        try:
            js = nc.jetstream()
            await js.add_stream(name=stream, subjects=[f"{stream}.>"])
            config = {
                "name": "c1",
                "ack_policy": "none",
                "deliver_policy": "all",
                "filter_subjects": [f"{stream}.a"],
            }
            answer = await nc.request(
                f"$JS.API.CONSUMER.CREATE.{stream}.c1",
                json_bytes({"stream_name": stream, "config": config}),
            )
            return json_load(answer.data)
        finally:
            await nc.close()

    info = ConsumerInfo.from_response(asyncio.run(go()))
    asked = ConsumerConfig(
        name="c1",
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=f"{stream}.a",
    )
    with pytest.raises(SourceError) as caught:
        verify_created(asked, info, server="2.9.10")
    assert str(caught.value).startswith("nats-server 2.9.10 did not create consumer c1 as asked")
    assert f"filter_subject is None, asked '{stream}.a'" in str(caught.value)


def json_bytes(value: object) -> bytes:
    import json

    return json.dumps(value).encode()


def json_load(data: bytes) -> dict[str, object]:
    import json

    return json.loads(data)


def test_messages_name_the_servers_without_their_credentials() -> None:
    # A servers override may carry user:password@ (NILUS_NATS_SERVERS, the nats resource); the
    # hosts shown in errors and logs must not.
    address = parse_nats_address("nats+jetstream://localhost:4222?subject=orders.>")
    source = JetStreamSource(address, "orders", servers=["nats://u:s3cret@h1:4222", "h2:4222"])
    assert source.hosts == "h1:4222, h2:4222"
