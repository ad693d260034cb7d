"""The public-API path of the pull inbox: taken when nats-py's private parser is not the one the
fast path was written for, checked at import, and tested here for real against the server."""

import logging

import pytest
from checker import check_exactly_once
from nats.aio.client import Client

from nilus_dagster.engine import run_pipeline
from nilus_dagster.jetstream import inbox


@pytest.fixture
def public_path(monkeypatch):
    """Force the fallback, as a nats-py without the private parser API would."""
    monkeypatch.setattr(inbox, "FAST_PATH_PROBLEM", "forced by the test")
    monkeypatch.setattr(inbox, "_warned", [])


def test_this_nats_py_has_what_the_fast_path_needs():
    assert inbox.FAST_PATH_PROBLEM is None
    assert inbox.fast_path_problem() is None


def test_a_missing_private_name_is_found_at_the_check(monkeypatch):
    monkeypatch.delattr(Client, "_process_headers")
    monkeypatch.delattr(inbox.nats_parser, "INFO_RE")

    problem = inbox.fast_path_problem()

    assert problem is not None
    assert "Client._process_headers" in problem and "parser.INFO_RE" in problem


def test_the_public_path_can_be_chosen_by_environment(monkeypatch):
    monkeypatch.setenv(inbox.PUBLIC_PARSER_ENV, "1")

    assert inbox.fast_path_problem() == f"{inbox.PUBLIC_PARSER_ENV} is set"


def test_a_run_on_the_public_path_commits_every_message_once_with_one_warning(
    public_path, publisher, stream_pipeline, caplog
):
    subject, pipeline = stream_pipeline(query="&batch_size=100")
    seqs = publisher.publish_orders(subject, 700)
    # A message with headers, as status messages and some producers' messages have.
    publisher.publish(subject, [b'{"order_id": "h"}'], headers={"trace": "t-1"})

    with caplog.at_level(logging.WARNING, logger="nilus_dagster.jetstream"):
        first = run_pipeline(pipeline)
        more = publisher.publish_orders(subject, 300, start=701)
        second = run_pipeline(pipeline)

    assert (first.messages, second.messages) == (701, 300)
    assert check_exactly_once(second.table_uri, [*seqs, 701, *more], pipeline.app_id).ok
    warnings = [r.getMessage() for r in caplog.records if "public API" in r.getMessage()]
    assert len(warnings) == 1 and "forced by the test" in warnings[0]


def test_the_fast_path_installs_no_column_reader_when_forced_off(public_path, nats_server):
    import asyncio

    async def go():
        nc = Client()
        await nc.connect(nats_server.url)
        try:
            subscription = await inbox.subscribe_columns(nc, nc.new_inbox(), object())
            await nc.publish(subscription.subscription.subject, b"x", reply="r")
            await nc.flush()
            await asyncio.wait_for(subscription.queue.get(), 5)
            assert subscription.fast_sid is None
            assert not isinstance(nc._ps, inbox.FastParser)
            assert subscription.inbox.take()[2] == [b"x"]
            await subscription.stop(nc)
        finally:
            await nc.close()

    asyncio.run(go())
