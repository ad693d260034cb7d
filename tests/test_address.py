"""``nats+jetstream://`` and sink address parsing: defaults, auth forms, every refusal."""

from datetime import datetime, timezone

import pytest

from nilus_dagster.jetstream.connection import server_urls
from nilus_dagster.manifest.address import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT_SECONDS,
    AddressError,
    NatsAddress,
    parse_nats_address,
    parse_sink_address,
)


def test_defaults_are_the_page_defaults() -> None:
    address = parse_nats_address("nats+jetstream://?subject=orders.created")

    assert address.servers == ("localhost:4222",)
    assert (DEFAULT_PORT, DEFAULT_BATCH_SIZE, DEFAULT_TIMEOUT_SECONDS) == (4222, 100, 10)
    assert address.subject == "orders.created"
    assert address.durable is None
    assert address.batch_size == 100
    assert address.timeout == 10
    assert address.failover_timeout == 30
    assert address.start_sequence is None
    assert address.start_time is None
    assert address.ack_policy == "none"
    assert address.format == "json"
    assert address.auth_mode == "none"
    assert address.placeholders() == []
    assert server_urls(address) == ["nats://localhost:4222"]


@pytest.mark.parametrize(
    ("authority", "servers"),
    [
        ("nats.prod", ("nats.prod:4222",)),
        ("nats.prod:5222", ("nats.prod:5222",)),
        (":5222", ("localhost:5222",)),
        ("a:4222,b:4223,c", ("a:4222", "b:4223", "c:4222")),
        ("[::1]:4333", ("[::1]:4333",)),
        ("[::1]", ("[::1]:4222",)),
        ("{NATS_HOST}:{NATS_PORT}", ("{NATS_HOST}:{NATS_PORT}",)),
    ],
)
def test_servers(authority: str, servers: tuple[str, ...]) -> None:
    address = parse_nats_address(f"nats+jetstream://{authority}?subject=s")

    assert address.servers == servers


def test_every_option_parses() -> None:
    address = parse_nats_address(
        "nats+jetstream://h:1?subject=orders.>&durable=nilus-orders&batch_size=7&timeout=0.5"
        "&failover_timeout=12.5&start_time=2025-01-31T01:00:00%2B01:00&ack_policy=explicit&format=raw"
        "&creds=/etc/nats/u.creds&tls=true&tls_ca=ca.pem&tls_cert=c.pem&tls_key=k.pem"
    )

    assert address.subject == "orders.>"
    assert address.durable == "nilus-orders"
    assert address.batch_size == 7
    assert address.timeout == 0.5
    assert address.failover_timeout == 12.5
    assert address.start_time == datetime(2025, 1, 31, tzinfo=timezone.utc)
    assert address.ack_policy == "explicit"
    assert address.format == "raw"
    assert address.creds == "/etc/nats/u.creds"
    assert address.auth_mode == "creds"
    assert (address.tls, address.tls_ca, address.tls_cert, address.tls_key) == (
        True,
        "ca.pem",
        "c.pem",
        "k.pem",
    )
    assert server_urls(address) == ["tls://h:1"]


def test_start_sequence_and_naive_start_time() -> None:
    assert parse_nats_address("nats+jetstream://h?subject=s&start_sequence=42").start_sequence == 42
    naive = parse_nats_address("nats+jetstream://h?subject=s&start_time=2025-01-31T00:00:00")
    assert naive.start_time == datetime(2025, 1, 31, tzinfo=timezone.utc)
    zulu = parse_nats_address("nats+jetstream://h?subject=s&start_time=2025-01-31T00:00:00Z")
    assert zulu.start_time == naive.start_time


def test_user_password_token_and_seed_forms() -> None:
    userpass = parse_nats_address("nats+jetstream://{U}:{P}@h:4222?subject=s")
    assert (userpass.user, userpass.password, userpass.auth_mode) == ("{U}", "{P}", "user/password")

    query_token = parse_nats_address("nats+jetstream://h:4222?subject=s&token={T}")
    userinfo_token = parse_nats_address("nats+jetstream://{T}@h:4222?subject=s")
    assert query_token.token == userinfo_token.token == "{T}"
    assert query_token == userinfo_token
    assert userinfo_token.auth_mode == "token"
    assert userinfo_token.user is None

    seed = parse_nats_address("nats+jetstream://h?subject=s&nkeys_seed={S}")
    assert (seed.nkeys_seed, seed.auth_mode, seed.placeholders()) == ("{S}", "nkeys", ["S"])


def test_percent_encoded_userinfo_is_decoded() -> None:
    address = parse_nats_address("nats+jetstream://bob:p%40ss%3Aw%2Fd@h?subject=s")

    assert (address.user, address.password) == ("bob", "p@ss:w/d")


def test_plus_in_a_literal_token_is_kept() -> None:
    # HTML-form decoding would turn '+' into a space and break a base64 token.
    address = parse_nats_address("nats+jetstream://h?subject=s&token=ab+cd/ef==")

    assert address.token == "ab+cd/ef=="


def test_placeholders_lists_every_name_once_in_order() -> None:
    address = parse_nats_address(
        "nats+jetstream://{USER}:{PASS}@{HOST}:4222?subject=s&tls_ca={CA}&tls_cert={CA}"
        "&tls_key={KEY}"
    )

    assert address.placeholders() == ["HOST", "USER", "PASS", "CA", "KEY"]


def test_repr_hides_credentials() -> None:
    address = parse_nats_address("nats+jetstream://bob:hunter2pw@h?subject=s")
    token = parse_nats_address("nats+jetstream://h?subject=s&token=tok-secret-1")
    seed = parse_nats_address("nats+jetstream://h?subject=s&nkeys_seed=SUAseedseedseed")

    assert "hunter2pw" not in repr(address)
    assert "tok-secret-1" not in repr(token)
    assert "SUAseedseedseed" not in repr(seed)
    assert "bob" in repr(address)  # the user name is useful and not a secret
    assert "hunter2pw" not in address.redacted()
    assert "tok-secret-1" not in token.redacted()


def test_address_is_a_frozen_value() -> None:
    address = parse_nats_address("nats+jetstream://h?subject=s")

    assert isinstance(address, NatsAddress)
    with pytest.raises(AttributeError):
        address.subject = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "part", "message"),
    [
        ("", "address", "is empty"),
        ("localhost:4222", "address", "is not a URI"),
        ("nats://h?subject=s", "scheme", "'nats' is not supported"),
        ("nats+jetstream://h/orders?subject=s", "address", "has a path '/orders'"),
        ("nats+jetstream://h:0?subject=s", "port", "must be a number from 1 to 65535"),
        ("nats+jetstream://h:65536?subject=s", "port", "must be a number from 1 to 65535"),
        ("nats+jetstream://h:-1?subject=s", "port", "must be a number from 1 to 65535"),
        ("nats+jetstream://h:x?subject=s", "port", "got 'x'"),
        ("nats+jetstream://a:1:2?subject=s", "host", "is not host:port"),
        ("nats+jetstream://a,,b?subject=s", "host", "empty entry"),
        ("nats+jetstream://[::1?subject=s", "host", "unclosed IPv6 bracket"),
        ("nats+jetstream://[::1]x?subject=s", "host", "is not [IPv6]:port"),
        ("nats+jetstream://:p@h?subject=s", "user", "is empty before ':'"),
        ("nats+jetstream://@h?subject=s", "user", "no credentials before it"),
        ("nats+jetstream://h", "subject", "is required: add ?subject=<subject>"),
        ("nats+jetstream://h?subject=", "subject", "is required"),
        ("nats+jetstream://h?subject=a..b", "subject", "is not a valid NATS subject"),
        ("nats+jetstream://h?subject=orders.", "subject", "is not a valid NATS subject"),
        ("nats+jetstream://h?subject=a>.b", "subject", "'>' only as the last token"),
        ("nats+jetstream://h?subject=>.b", "subject", "is not a valid NATS subject"),
        ("nats+jetstream://h?subject=a%20b", "subject", "is not a valid NATS subject"),
        ("nats+jetstream://h?subject=s&subject=t", "subject", "is given twice"),
        ("nats+jetstream://h?subject=s&=x", "address", "option without a name"),
        ("nats+jetstream://h?subject=s&batchsize=5", "batchsize", "did you mean batch_size?"),
        ("nats+jetstream://h?subject=s&batch_size=0", "batch_size", "positive whole number"),
        ("nats+jetstream://h?subject=s&batch_size=1.5", "batch_size", "positive whole number"),
        ("nats+jetstream://h?subject=s&timeout=-1", "timeout", "positive number of seconds"),
        ("nats+jetstream://h?subject=s&timeout=nan", "timeout", "positive number of seconds"),
        ("nats+jetstream://h?subject=s&timeout=inf", "timeout", "positive number of seconds"),
        (
            "nats+jetstream://h?subject=s&failover_timeout=0",
            "failover_timeout",
            "positive number of seconds",
        ),
        ("nats+jetstream://h?subject=s&start_sequence=0", "start_sequence", "positive whole"),
        (
            "nats+jetstream://h?subject=s&start_time=0001-01-01T00:00:00%2B01:00",
            "start_time",
            "ISO-8601",
        ),
        ("nats+jetstream://h?subject=s&tls=maybe", "tls", "must be true or false"),
        ("nats+jetstream://h?subject=s&durable=a.b", "durable", "not a valid consumer name"),
        ("nats+jetstream://h?subject=s&durable=", "durable", "not a valid consumer name"),
        ("nats+jetstream://h?subject=s&token=", "token", "is empty: write token={NATS_TOKEN}"),
        ("nats+jetstream://h?subject=s&nkeys_seed=", "nkeys_seed", "is empty"),
        ("nats+jetstream://h?subject=s&token={T}&creds=u.creds", "auth", "several auth modes"),
        ("nats+jetstream://h?subject=s&tls_key=k.pem", "tls_cert", "is missing"),
    ],
)
def test_refusals_name_the_part(raw: str, part: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_nats_address(raw)

    assert caught.value.part == part
    assert message in str(caught.value)


def test_sink_addresses() -> None:
    depot = parse_sink_address("dataos://orders-lakehouse?purpose=rw")
    assert (depot.is_depot, depot.depot, depot.root) == (True, "orders-lakehouse", None)
    assert depot.params == (("purpose", "rw"),)

    s3 = parse_sink_address("s3://bucket/prefix/")
    assert (s3.is_depot, s3.root) == (False, "s3://bucket/prefix")
    assert parse_sink_address("./lake").root == "./lake"


@pytest.mark.parametrize(
    ("raw", "part", "message"),
    [
        ("", "address", "is empty: write dataos://<depot>?purpose=rw"),
        ("dataos://?purpose=rw", "depot", "is not a depot name"),
        ("dataos://a/b?purpose=rw", "depot", "is not a depot name"),
        ("dataos://lake?purpose=r", "purpose", "is r (read-only); a sink needs purpose=rw"),
        ("dataos://lake?purpose=x", "purpose", "must be r, w or rw"),
        ("dataos://lake?acl=rw", "acl", "only purpose="),
        ("kafka://broker/topic", "scheme", "'kafka' is not a supported sink"),
    ],
)
def test_sink_refusals(raw: str, part: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_sink_address(raw)

    assert caught.value.part == part
    assert message in str(caught.value)
