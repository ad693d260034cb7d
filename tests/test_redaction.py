"""redact(): credentials in addresses, raw seeds and registered values are masked; names are not."""

import logging
import uuid

import pytest

from nilus_dagster.redaction import (
    RedactingFilter,
    install_log_redaction,
    isolated_secret_registry,
    redact,
    register_secret,
)

# Values filled or registered here must not mask text in other tests.
pytestmark = pytest.mark.usefixtures("isolated_secrets")

# The example user seed from the NATS documentation (public, not a credential).
SEED = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "nats+jetstream://bob:hunter2@nats.prod:4222?subject=s",
            "nats+jetstream://bob:***@nats.prod:4222?subject=s",
        ),
        (
            "connect nats://alice:p@ss@h:4222 failed",
            "connect nats://alice:***@h:4222 failed",
        ),
        ("nats+jetstream://s3cr3ttoken@h:4222?subject=s", "nats+jetstream://***@h:4222?subject=s"),
        ("nats+jetstream://h?subject=s&token=abc123", "nats+jetstream://h?subject=s&token=***"),
        (
            "nats+jetstream://h?nkeys_seed=SUAxyz&subject=s",
            "nats+jetstream://h?nkeys_seed=***&subject=s",
        ),
        (
            "postgres://h/db?password=pw1&sslmode=require",
            "postgres://h/db?password=***&sslmode=require",
        ),
        (
            "s3 url ...?X-Amz-Security-Token=tok&sig=abc",
            "s3 url ...?X-Amz-Security-Token=***&sig=***",
        ),
        (f"seed {SEED} leaked", "seed *** leaked"),
        (f"in quotes '{SEED}'", "in quotes '***'"),
        ("two: a://u:p1@h b://v:p2@k", "two: a://u:***@h b://v:***@k"),
    ],
)
def test_credentials_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "nats+jetstream://{NATS_USERNAME}:{NATS_PASSWORD}@nats.prod:4222?subject=s",
        "nats+jetstream://{NATS_TOKEN}@nats.prod:4222?subject=s",
        "nats+jetstream://h:4222?subject=s&token={NATS_TOKEN}&batch_size=10",
        "nats+jetstream://h:4222?subject=s&nkeys_seed={NATS_NKEYS_SEED}",
        "dataos://orders-lakehouse?purpose=rw",
        "nats+jetstream://localhost:4222?subject=orders.created&durable=nilus-orders",
        "stream orders-stream subject orders.created -> analytics.orders_stream",
        "an e-mail bob@example.com is not a URI",
    ],
)
def test_placeholders_and_plain_text_are_kept(text: str) -> None:
    assert redact(text) == text


def test_registered_values_are_masked_anywhere() -> None:
    secret = unique("reg-")
    assert redact(f"value {secret} here") == f"value {secret} here"

    register_secret(secret)

    assert redact(f"value {secret} here, {secret}!") == "value *** here, ***!"
    assert redact({"password": secret}) == "{'password': '***'}"


def test_longest_registered_value_wins() -> None:
    short = unique("s")
    long = short + "-and-more"
    register_secret(short)
    register_secret(long)

    assert redact(f"<{long}>") == "<***>"


def test_tiny_or_empty_values_are_not_registered() -> None:
    register_secret(None)
    register_secret("")
    register_secret("ab")

    assert redact("ab abc") == "ab abc"


def test_filter_on_a_logger(caplog: pytest.LogCaptureFixture) -> None:
    secret = unique("log-")
    register_secret(secret)
    logger = logging.getLogger(f"test_redaction.{uuid.uuid4().hex}")
    logger.addFilter(RedactingFilter())

    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("connecting to %s with %s", "nats://bob:pw9@h:4222", secret)
        logger.info("token=%s", "plain-token")
        try:
            raise RuntimeError(f"auth failed for {secret}")
        except RuntimeError:
            logger.exception("run failed")

    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["connecting to nats://bob:***@h:4222 with ***", "token=***", "run failed"]
    assert secret not in caplog.text
    assert "auth failed for ***" in caplog.text
    assert "pw9" not in caplog.text


def test_a_logger_filter_alone_misses_child_loggers_install_covers_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = unique("child-")
    register_secret(secret)
    parent = logging.getLogger(f"test_redaction_tree_{uuid.uuid4().hex}")
    child = logging.getLogger(f"{parent.name}.engine")
    parent.addFilter(RedactingFilter())

    with caplog.at_level(logging.INFO):
        child.info("before install: %s", secret)
        install_log_redaction(parent)
        install_log_redaction(parent)  # idempotent
        child.info("after install: %s", secret)
        parent.warning("parent: %s", secret)
        logging.getLogger("unrelated").info("untouched %s", "nats://u:visible@h")

    assert [r.getMessage() for r in caplog.records] == [
        f"before install: {secret}",
        "after install: ***",
        "parent: ***",
        "untouched nats://u:visible@h",
    ]
    assert sum(isinstance(f, RedactingFilter) for f in parent.filters) == 1


def test_bad_format_args_do_not_break_logging(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(f"test_redaction.bad.{uuid.uuid4().hex}")
    logger.addFilter(RedactingFilter())

    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("%s and %s", "nats://u:pw-bad@h")

    assert "pw-bad" not in caplog.text
    assert "***" in caplog.records[0].getMessage()


def test_isolated_registry_forgets_what_was_registered_inside() -> None:
    kept = unique("kept-")
    inside = unique("inside-")
    register_secret(kept)

    with isolated_secret_registry():
        register_secret(inside)
        assert redact(f"{kept} {inside}") == "*** ***"

    assert redact(f"{kept} {inside}") == f"*** {inside}"
