"""The consumer and puller one read of a source goes through, and what interrupts it.

A read may replace them several times (a failover recreates the consumer after the last
sequence read); this holds the current pair, listens on their connection for it closing or
for a permission the server refused, and tears them down.
"""

from collections.abc import Awaitable, Callable

from nilus_dagster.jetstream.connection import Link
from nilus_dagster.jetstream.errors import PermissionViolation
from nilus_dagster.jetstream.pull import BulkPuller
from nilus_dagster.messages import MessageBatch


class Reader:
    """The current consumer and puller of one read.

    Args:
        pullers: The source's running pullers (a started puller is added, a dropped one
            removed), stopped when the source closes.
        delete_consumer: Deletes a consumer of the source (best effort).
    """

    def __init__(
        self,
        pullers: set[BulkPuller],
        delete_consumer: Callable[[Link, str], Awaitable[None]],
    ):
        self._pullers = pullers
        self._delete_consumer = delete_consumer
        self.link: Link | None = None
        self.consumer: str | None = None
        self.puller: BulkPuller | None = None
        self.refused: list[PermissionViolation] = []
        """Permissions the server refused to the puller: the cause of its interruption."""

    async def start(self, puller: BulkPuller) -> None:
        """Pull through ``puller`` (on :attr:`link`, from :attr:`consumer`).

        It is interrupted when the link closes or refuses the puller a permission.
        """
        assert self.link is not None
        self.puller = puller
        self.link.listen(self._on_link_event)
        self._pullers.add(puller)
        await puller.start()

    async def next_batch(self, wanted: int | None) -> MessageBatch:
        """The puller's next batch (see :meth:`BulkPuller.next_batch`)."""
        assert self.puller is not None
        return await self.puller.next_batch(wanted)

    async def drop(self) -> None:
        """Stop the puller and delete the consumer; :attr:`link` stays, for a liveness check."""
        if self.puller is not None:
            self._pullers.discard(self.puller)
            await self.puller.stop()
            self.puller = None
        if self.link is not None:
            self.link.unlisten(self._on_link_event)
            if self.consumer is not None:
                await self._delete_consumer(self.link, self.consumer)
        self.consumer = None

    def _on_link_event(self, what: str, detail: BaseException | None) -> None:
        puller = self.puller
        if puller is None:
            return
        if what == "closed":
            puller.interrupt("the connection to NATS closed", connection_lost=True)
        elif isinstance(detail, PermissionViolation):
            if detail.on_inbox:
                self.refused.append(detail)
            elif detail.kind == "publish" and detail.about(puller.request_subject):
                self.refused.append(PermissionViolation("publish", puller.request_subject))
            else:
                return
            puller.interrupt(str(detail), fatal=True)
