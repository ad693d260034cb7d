"""The durable consumer named in an address: kept at the table's position, never read from.

A run reads through a consumer of its own; the durable only mirrors the committed position, so
``nats consumer info`` shows the table's view. :class:`DurableMirror` puts it there at the start
of a run and after each commit: reset in place where the server allows it (2.14+), else deleted
and created again at the right sequence.
"""

import contextlib
import logging

from nats.js.api import ConsumerInfo

from nilus_dagster.jetstream import admin
from nilus_dagster.jetstream.connection import Link
from nilus_dagster.jetstream.consumers import (
    ConsumerSpec,
    durable_config,
    misalignment,
    new_ephemeral_name,
    probe_config,
    resettable,
    verify_created,
)
from nilus_dagster.jetstream.diagnostics import Diagnostics
from nilus_dagster.jetstream.errors import (
    ERR_CONSUMER_NOT_FOUND,
    ERR_CONSUMER_START_CHANGED,
    ERR_STREAM_NOT_FOUND,
    JsApiError,
    NoResponders,
    TransportError,
)

logger = logging.getLogger(__name__)

RESET_API_VERSION = (2, 14, 0)


def server_version_text(link: Link) -> str:
    """The connected server's version, for messages."""
    return ".".join(map(str, link.server_version))


class DurableMirror:
    """Moves one durable consumer to where the table says the stream was read up to.

    Args:
        spec: The consumers of the source (``spec.durable`` is set).
        diagnostics: Explains failures on the source's stream.
        delete_timeout: Seconds for a best-effort delete of a probe consumer.
    """

    def __init__(self, spec: ConsumerSpec, diagnostics: Diagnostics, delete_timeout: float):
        assert spec.durable is not None
        self.spec = spec
        self.name = spec.durable
        self.stream = spec.stream
        self.diagnostics = diagnostics
        self.delete_timeout = delete_timeout
        self.realign_reasons: list[str] = []

    async def align(self, link: Link, start_seq: int) -> None:
        """Create the durable at ``start_seq``, or move it there if it is elsewhere.

        A move is recorded in :attr:`realign_reasons` and logged.

        Raises:
            SourceError: The durable cannot be read, created or moved.
        """
        doing = f"read durable consumer {self.name}"
        try:
            info: ConsumerInfo | None = await admin.consumer_info(link, self.stream, self.name)
        except JsApiError as exc:
            if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                if exc.err_code == ERR_STREAM_NOT_FOUND:
                    await self.diagnostics.note_streams(link)
                raise self.diagnostics.error(exc, doing) from None
            info = None
        except NoResponders as exc:
            raise await self.diagnostics.no_responders_error(link, exc, doing) from None
        except TransportError as exc:
            raise self.diagnostics.error(exc, doing) from None

        if info is None:
            await self.recreate(link, start_seq, exists=False)
            return
        wrong = misalignment(info, self.spec, start_seq)
        if (
            wrong is not None
            and wrong.position_only
            and await self._nothing_between(link, info, start_seq)
        ):
            wrong = None
        if wrong is None:
            return
        self.realign_reasons.append(wrong.reason)
        logger.warning(
            "durable consumer %s on stream %s realigned to sequence %d: %s",
            self.name,
            self.stream,
            start_seq,
            wrong.reason,
        )
        await self.move(link, start_seq, info)

    async def move(self, link: Link, start_seq: int, info: ConsumerInfo | None = None) -> None:
        """Put the existing durable at ``start_seq``.

        Reset in place where the server (2.14+) and its settings (``info``, when known) allow,
        else deleted and created again.
        """
        if (info is None or resettable(info, self.spec)) and await self._reset(link, start_seq):
            return
        if info is None and link.server_version >= RESET_API_VERSION:
            # (A realignment logged its reason already.)
            logger.warning(
                "durable consumer %s could not be reset to sequence %d in place (were its "
                "settings changed?); recreating it",
                self.name,
                start_seq,
            )
        await self.recreate(link, start_seq)

    async def recreate(self, link: Link, start_seq: int, *, exists: bool = True) -> None:
        """Delete the durable (when it exists) and create it at ``start_seq``."""
        config = durable_config(self.spec, start_seq)
        doing = f"create durable consumer {self.name}"
        for attempt in (1, 2):
            if exists or attempt == 2:
                await self._delete(link)
            try:
                created = await admin.create_consumer(link, self.stream, config)
            except JsApiError as exc:
                if exc.err_code == ERR_CONSUMER_START_CHANGED and attempt == 1:
                    # Another run made it between our delete and create (on 2.9 every run
                    # moves the durable this way after each commit): replace it once more.
                    continue
                raise self.diagnostics.error(exc, doing) from None
            except TransportError as exc:
                raise self.diagnostics.error(exc, doing) from None
            verify_created(config, created, server=server_version_text(link))
            return

    async def _delete(self, link: Link) -> None:
        doing = f"delete durable consumer {self.name} to realign it"
        try:
            await admin.delete_consumer(link, self.stream, self.name)
        except JsApiError as exc:
            if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                raise self.diagnostics.error(exc, doing) from None
        except TransportError as exc:
            raise self.diagnostics.error(exc, doing) from None

    async def _nothing_between(self, link: Link, info: ConsumerInfo, start_seq: int) -> bool:
        """Whether reading from ``start_seq`` or from the durable's next sequence is the same.

        That is, whether no message of the subject lies between the two.
        The durable's pending count covers the subject from its next sequence on; a probe
        counts it from ``start_seq`` on. Equal counts: only other subjects (or nothing) lie in
        between, which happens when a filtered consumer moved past them (2.9 does).
        """
        name = new_ephemeral_name("nilus_align")
        probe = probe_config(self.spec.subject, name, start_seq=start_seq)
        try:
            counted = await admin.create_consumer(link, self.stream, probe)
        except TransportError:
            return False
        finally:
            if link.is_open:
                with contextlib.suppress(Exception):  # it expires by itself otherwise
                    await admin.delete_consumer(
                        link, self.stream, name, timeout=self.delete_timeout
                    )
        counted_pending = -1 if counted.num_pending is None else counted.num_pending
        info_pending = -2 if info.num_pending is None else info.num_pending
        return int(counted_pending) == int(info_pending)

    async def _reset(self, link: Link, start_seq: int) -> ConsumerInfo | None:
        """Move the durable in place (nats-server 2.14+): its info, or ``None`` if not possible."""
        if link.server_version < RESET_API_VERSION:
            return None
        try:
            after = await admin.reset_consumer(link, self.stream, self.name, start_seq)
        except TransportError:
            # Not possible here (settings, permissions, a lost connection): recreate instead,
            # which reports what is wrong if that fails too.
            return None
        if misalignment(after, self.spec, start_seq) is not None:
            return None
        return after
