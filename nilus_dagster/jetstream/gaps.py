"""Messages of the pipeline's subject removed after the committed position, before a run read them.

A stream's ``first_seq`` shows removals from the front of the whole stream (``max_age``,
``max_msgs``, a purge). Removals of one subject of a shared stream (``max_msgs_per_subject``, a
purge by subject) leave it alone, so this looks at the subject itself, with a few API calls and
no consumer that delivers anything:

1. the subject's next stored message after the position (``STREAM.MSG.GET`` with
   ``next_by_subj``, nats-server 2.9 and later). If it directly follows the position, or the
   stream has nothing after the position, nothing can be missing.
2. whether the message at the position is still stored. Per-subject retention and purges remove
   a subject's oldest messages first, so while the position's own message is there, none of the
   subject's later messages was removed by them.
3. otherwise the sequences between the position and the subject's next message that are no
   longer stored: the span minus what two counting consumers (no filter, at either end) say is
   still there.

The count of step 3 is exact when those sequences were the subject's (a stream of its own, or a
purge by subject in a stream whose other subjects keep theirs); where other subjects lost
messages in that span too, it counts theirs as well: an upper bound. Single messages deleted by
hand (``STREAM.MSG.DELETE``) after a position that is still stored are not seen.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nilus_dagster.jetstream.consumers import new_ephemeral_name, probe_config
from nilus_dagster.jetstream.state import StreamState

logger = logging.getLogger(__name__)

ERR_NO_MESSAGE = 10037

Api = Callable[[str, dict[str, Any] | None], Awaitable[dict[str, Any]]]
"""A JetStream API call: ``(subject, body) -> answer``; raises on an error answer."""


class NoMessage(Exception):
    """The stream holds no message where one was asked for (``err_code`` 10037)."""


async def _message_seq(api: Api, stream: str, body: dict[str, Any]) -> int | None:
    """The sequence of the message a ``STREAM.MSG.GET`` asks for, ``None`` when there is none."""
    try:
        answer = await api(f"$JS.API.STREAM.MSG.GET.{stream}", body)
    except NoMessage:
        return None
    return int(answer["message"]["seq"])


async def _stored_from(api: Api, stream: str, seq: int) -> int:
    """How many messages (any subject) the stream holds at ``seq`` and after."""
    config = probe_config(">", new_ephemeral_name("nilus_gap"), start_seq=seq)
    del config["filter_subject"]  # every subject: the stream's own count from seq on
    name = config["name"]
    try:
        info = await api(
            f"$JS.API.CONSUMER.CREATE.{stream}.{name}", {"stream_name": stream, "config": config}
        )
    finally:
        try:
            await api(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", None)
        except Exception:  # it goes away by itself after its inactive threshold
            logger.debug("could not delete counting consumer %s", name)
    return int(info.get("num_pending", 0) or 0)


async def removed_after(
    api: Api, stream: str, subject: str, position: int, state: StreamState
) -> int:
    """Sequences after ``position`` that retention or a purge removed before they were read,
    from the stream as a whole or from ``subject`` alone (see the module's docstring).

    Args:
        api: Makes a JetStream API request; must raise :class:`NoMessage` for ``err_code``
            10037 and any other exception for other failures.
        stream: The stream.
        subject: The pipeline's subject (its filter).
        position: The last committed sequence; 0 (nothing committed) never has a gap.
        state: The stream's state, read just before.
    """
    if position <= 0:
        return 0
    stream_wide = state.gap_after(position)
    if position >= state.last_seq:
        return stream_wide
    nxt = await _message_seq(api, stream, {"seq": position + 1, "next_by_subj": subject})
    end = nxt if nxt is not None else state.last_seq + 1
    if end <= max(position + 1, state.first_seq):
        return stream_wide
    if state.first_seq <= position:
        at_position = await _message_seq(api, stream, {"seq": position})
        if at_position is not None:
            return 0
    span = end - position - 1
    stored = await _stored_from(api, stream, position + 1)
    if nxt is not None:
        stored -= await _stored_from(api, stream, end)
    return max(stream_wide, span - stored)
