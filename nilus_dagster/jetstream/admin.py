"""The JetStream API calls the source makes, each one typed: the subjects and bodies live here.

Stream info, stream names, consumer create/info/reset/delete, the last message of a subject and
a single no-wait pull. Each takes the :class:`~nilus_dagster.jetstream.connection.Link` to use
(the source replaces it after a reconnect) and raises the link's
:class:`~nilus_dagster.jetstream.errors.TransportError` subclasses; turning those into messages
for a person is the caller's job (:mod:`nilus_dagster.jetstream.diagnostics`).
"""

import contextlib
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DEFAULT_PREFIX, ConsumerConfig, ConsumerInfo

from nilus_dagster.jetstream.connection import Link
from nilus_dagster.jetstream.consumers import counting_config
from nilus_dagster.jetstream.errors import ERR_CLUSTER_NOT_AVAILABLE, ERR_NO_MESSAGE, JsApiError
from nilus_dagster.jetstream.state import StreamState, parse_time

API_PREFIX = DEFAULT_PREFIX

# Durations nats-py sends as 0 when unset; left out instead, so that a request carries only
# what we set (the server's defaults apply either way).
_DURATIONS = ("ack_wait", "idle_heartbeat", "inactive_threshold")


def next_subject(stream: str, consumer: str, prefix: str = API_PREFIX) -> str:
    """The subject pull requests for ``consumer`` go to."""
    return f"{prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"


def create_subject(stream: str, name: str, filter_subject: str, prefix: str = API_PREFIX) -> str:
    """The create API subject.

    The filter is part of it when it is a literal subject, so permissions can be scoped to it.
    """
    if "*" in filter_subject or ">" in filter_subject:
        return f"{prefix}.CONSUMER.CREATE.{stream}.{name}"
    return f"{prefix}.CONSUMER.CREATE.{stream}.{name}.{filter_subject}"


def config_body(config: ConsumerConfig) -> dict[str, Any]:
    """The ``config`` object of a create request."""
    body = config.as_dict()
    for key in _DURATIONS:
        if getattr(config, key) is None:
            body.pop(key, None)
    return body


async def account_info(link: Link) -> dict[str, Any]:
    """``$JS.API.INFO``: answers only where JetStream is enabled for the account."""
    return await link.api(f"{API_PREFIX}.INFO")


async def stream_info(link: Link, stream: str) -> StreamState:
    """The stream's state and configuration.

    Raises:
        JsApiError: ``ERR_CLUSTER_NOT_AVAILABLE`` (retryable) for an answer without a leader:
            while a replicated stream elects one, a replica answers with its own state, which
            may be behind (a run once read ``last_seq`` 0 of a new stream of 10,000 messages).
    """
    subject = f"{API_PREFIX}.STREAM.INFO.{stream}"
    info = await link.api(subject)
    cluster = info.get("cluster")
    if isinstance(cluster, dict) and cluster.get("replicas") and not cluster.get("leader"):
        raise JsApiError(
            subject,
            503,
            ERR_CLUSTER_NOT_AVAILABLE,
            f"stream {stream} has no leader (an election is under way), so its state is not "
            "known for sure",
        )
    return StreamState.from_info(info)


async def stream_names(link: Link) -> list[str]:
    """The names of the streams on the server (the first page), sorted."""
    answer = await link.api(f"{API_PREFIX}.STREAM.NAMES", {"offset": 0})
    return sorted(answer.get("streams") or [])


async def create_consumer(
    link: Link, stream: str, config: ConsumerConfig, *, timeout: float | None = None
) -> ConsumerInfo:
    """Create (or update) a consumer on ``stream``; the server's view of it."""
    assert config.name is not None and config.filter_subject is not None
    answer = await link.api(
        create_subject(stream, config.name, config.filter_subject),
        {"stream_name": stream, "config": config_body(config)},
        timeout,
    )
    return ConsumerInfo.from_response(answer)


async def consumer_info(link: Link, stream: str, name: str) -> ConsumerInfo:
    """A consumer's config and state."""
    return ConsumerInfo.from_response(await link.api(f"{API_PREFIX}.CONSUMER.INFO.{stream}.{name}"))


async def reset_consumer(link: Link, stream: str, name: str, seq: int) -> ConsumerInfo:
    """Move a consumer to ``seq`` in place (nats-server 2.14+); its info afterwards."""
    answer = await link.api(f"{API_PREFIX}.CONSUMER.RESET.{stream}.{name}", {"seq": max(1, seq)})
    return ConsumerInfo.from_response(answer)


async def delete_consumer(
    link: Link, stream: str, name: str, *, timeout: float | None = None
) -> None:
    """Delete a consumer."""
    await link.api(f"{API_PREFIX}.CONSUMER.DELETE.{stream}.{name}", None, timeout)


async def last_message_time(link: Link, stream: str, subject: str) -> datetime:
    """When the newest message on ``subject`` was stored (a direct read of the stream).

    Raises:
        JsApiError: ``ERR_NO_MESSAGE`` when there is none.
    """
    answer = await link.api(f"{API_PREFIX}.STREAM.MSG.GET.{stream}", {"last_by_subj": subject})
    return parse_time(str(answer["message"]["time"]))


async def message_seq(
    link: Link, stream: str, seq: int, *, next_by_subject: str | None = None
) -> int | None:
    """The sequence of the message stored at ``seq``; ``None`` when there is none.

    With ``next_by_subject``: of that subject's first message at or after ``seq``.
    """
    body: dict[str, Any] = {"seq": seq}
    if next_by_subject is not None:
        body["next_by_subj"] = next_by_subject
    try:
        answer = await link.api(f"{API_PREFIX}.STREAM.MSG.GET.{stream}", body)
    except JsApiError as exc:
        if exc.err_code == ERR_NO_MESSAGE:
            return None
        raise
    return int(answer["message"]["seq"])


async def stored_from(link: Link, stream: str, name: str, seq: int) -> int:
    """How many messages of any subject the stream holds at ``seq`` and after.

    That is the pending count of a consumer ``name`` without a filter, created there and
    deleted again.
    """
    config = counting_config(name, seq)
    subject = f"{API_PREFIX}.CONSUMER.CREATE.{stream}.{name}"
    try:
        answer = await link.api(subject, {"stream_name": stream, "config": config_body(config)})
    finally:
        with contextlib.suppress(Exception):  # it expires by itself otherwise
            await delete_consumer(link, stream, name, timeout=2.0)
    return int(answer.get("num_pending", 0) or 0)


async def next_message(link: Link, stream: str, consumer: str) -> Msg:
    """One message of ``consumer`` if it has one now (a no-wait pull of one)."""
    return await link.request(next_subject(stream, consumer), b'{"batch":1,"no_wait":true}')
