"""Questions about the stream answered by short-lived consumers, which read nothing.

How many messages of the subject lie after a position (filters included: the stream's own
counts cover every subject), which sequence a start time falls on, and when the newest message
was stored. Each probe is deleted after it answered; one that is not expires by itself.
"""

import contextlib
from datetime import datetime

from nats.js.api import ConsumerConfig, ConsumerInfo

from nilus_dagster.jetstream import admin
from nilus_dagster.jetstream.ack import parse_ack_reply
from nilus_dagster.jetstream.connection import Link
from nilus_dagster.jetstream.consumers import (
    new_ephemeral_name,
    next_sequence,
    pending,
    probe_config,
)
from nilus_dagster.jetstream.diagnostics import Diagnostics
from nilus_dagster.jetstream.errors import (
    ERR_NO_MESSAGE,
    ERR_STREAM_NOT_FOUND,
    JsApiError,
    PermissionViolation,
    TransportError,
)
from nilus_dagster.jetstream.state import format_time, parse_time_ns


class Probes:
    """Asks the stream questions about one subject.

    Args:
        stream: Stream name.
        subject: The pipeline's subject.
        diagnostics: Explains failures.
        delete_timeout: Seconds for the best-effort delete of a probe.
    """

    def __init__(self, stream: str, subject: str, diagnostics: Diagnostics, delete_timeout: float):
        self.stream = stream
        self.subject = subject
        self.diagnostics = diagnostics
        self.delete_timeout = delete_timeout

    async def pending_after(self, link: Link, position: int) -> int:
        """Messages on the subject with a sequence above ``position``."""
        name = new_ephemeral_name("nilus_lag")
        config = probe_config(self.subject, name, start_seq=position + 1)
        return pending(await self._ask(link, config, "count the pending messages"))

    async def seq_for_time(self, link: Link, start_time: datetime) -> int:
        """The first stream sequence stored at or after ``start_time``."""
        name = new_ephemeral_name("nilus_time")
        config = probe_config(self.subject, name, start_time=format_time(start_time))
        return next_sequence(
            await self._ask(link, config, "find the first message after start_time")
        )

    async def last_message_time(self, link: Link) -> datetime | None:
        """When the newest message on the subject was stored, or ``None`` if there is none."""
        doing = "read the newest message on the subject"
        try:
            return await admin.last_message_time(link, self.stream, self.subject)
        except JsApiError as exc:
            if exc.err_code == ERR_NO_MESSAGE:
                return None
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                raise self.diagnostics.error(exc, doing) from None
        except PermissionViolation as exc:
            if exc.kind == "subscribe":
                raise self.diagnostics.error(exc, doing) from None
        except TransportError as exc:
            raise self.diagnostics.error(exc, doing) from None
        # Direct reads refused: a consumer that delivers only the last message tells as well.
        return await self._last_time_by_consumer(link, doing)

    async def _last_time_by_consumer(self, link: Link, doing: str) -> datetime | None:
        name = new_ephemeral_name("nilus_last")
        info = await self._create(link, probe_config(self.subject, name, last=True), doing)
        try:
            if not pending(info):
                return None
            msg = await admin.next_message(link, self.stream, name)
            if not msg.reply:
                return None
            return parse_time_ns(parse_ack_reply(msg.reply).timestamp_ns)
        except TransportError as exc:
            raise self.diagnostics.error(exc, doing) from None
        finally:
            await self.delete(link, name)

    async def _ask(self, link: Link, config: ConsumerConfig, doing: str) -> ConsumerInfo:
        """Create a throwaway consumer, return its info, delete it."""
        assert config.name is not None
        info = await self._create(link, config, doing)
        await self.delete(link, config.name)
        return info

    async def _create(self, link: Link, config: ConsumerConfig, doing: str) -> ConsumerInfo:
        return await self.diagnostics.call(
            link, admin.create_consumer(link, self.stream, config), doing
        )

    async def delete(self, link: Link, name: str) -> None:
        """Delete a consumer, best effort: one that is not deleted expires by itself."""
        if not link.is_open:
            return
        with contextlib.suppress(Exception):
            await admin.delete_consumer(link, self.stream, name, timeout=self.delete_timeout)
