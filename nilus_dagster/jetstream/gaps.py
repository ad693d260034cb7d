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

from nilus_dagster.jetstream import admin
from nilus_dagster.jetstream.connection import Link
from nilus_dagster.jetstream.consumers import new_ephemeral_name
from nilus_dagster.jetstream.state import StreamState


async def removed_after(
    link: Link, stream: str, subject: str, position: int, state: StreamState
) -> int:
    """Sequences after ``position`` that retention or a purge removed before they were read.

    From the stream as a whole or from ``subject`` alone (see the module's docstring).

    Args:
        link: The connection.
        stream: The stream.
        subject: The pipeline's subject (its filter).
        position: The last committed sequence; 0 (nothing committed) never has a gap.
        state: The stream's state, read just before.

    Raises:
        TransportError: A request failed (a refused direct read or unfiltered consumer: the
            caller falls back to :meth:`StreamState.gap_after`).
    """
    if position <= 0:
        return 0
    stream_wide = state.gap_after(position)
    if position >= state.last_seq:
        return stream_wide
    nxt = await admin.message_seq(link, stream, position + 1, next_by_subject=subject)
    end = nxt if nxt is not None else state.last_seq + 1
    if end <= max(position + 1, state.first_seq):
        return stream_wide  # nothing of the subject can hide between: exact as it is
    if state.first_seq <= position and await admin.message_seq(link, stream, position):
        return 0  # the subject's oldest-first removals have not reached the position
    stored = await admin.stored_from(link, stream, new_ephemeral_name("nilus_gap"), position + 1)
    if nxt is not None:
        stored -= await admin.stored_from(link, stream, new_ephemeral_name("nilus_gap"), end)
    return max(stream_wide, end - position - 1 - stored)
