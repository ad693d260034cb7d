"""The source's connection to NATS over a run: opened once, made again when it is lost.

A :class:`Session` holds the current :class:`~nilus_dagster.jetstream.connection.Link`, checks
at the start that JetStream answers, reconnects (one attempt at a time, the caller keeps the
time budget) and closes a connection that stopped answering so that the next attempt starts
afresh.
"""

import asyncio
import logging
from collections.abc import Sequence
from urllib.parse import urlparse

from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream import admin
from nilus_dagster.jetstream.connection import Link, connect
from nilus_dagster.jetstream.diagnostics import Diagnostics
from nilus_dagster.jetstream.errors import (
    JS_NOT_ENABLED_CODES,
    ConnectionLost,
    JsApiError,
    NoResponders,
    PermissionViolation,
    TransportError,
)
from nilus_dagster.manifest.address import NatsAddress
from nilus_dagster.redaction import redact

logger = logging.getLogger("nilus_dagster.jetstream.source")


class Session:
    """One source's connection, for the length of a run.

    Args:
        address: The pipeline's address (credentials and TLS).
        urls: Server URLs to connect to.
        diagnostics: Explains failures.
        connect_timeout: Seconds for one connection attempt, and for one API request.
        client_name: Connection name shown by the server's monitoring.
    """

    def __init__(
        self,
        address: NatsAddress,
        urls: Sequence[str],
        diagnostics: Diagnostics,
        *,
        connect_timeout: float,
        client_name: str,
    ):
        self.address = address
        self.urls = list(urls)
        self.diagnostics = diagnostics
        self.connect_timeout = connect_timeout
        self.client_name = client_name
        self.link: Link | None = None
        self.reconnects = 0
        self._connected_to: str | None = None

    async def open(self) -> None:
        """Connect (one attempt: a run against servers that are all down fails at once).

        Raises:
            SourceError: The server cannot be reached or refuses the credentials.
        """
        self.link = await self._connect()

    async def check_jetstream(self, link: Link) -> None:
        """Check that JetStream answers on ``link``.

        Raises:
            SourceError: JetStream is off (not retryable), or does not answer yet (retryable:
                a cluster without a meta leader for a moment).
        """
        await self._check_jetstream(link)

    async def close(self) -> None:
        """Close the connection (bounded)."""
        if self.link is not None:
            await self.link.close()
        self.link = None

    async def _connect(self) -> Link:
        link = await connect(
            self.address,
            self.urls,
            connect_timeout=self.connect_timeout,
            request_timeout=self.connect_timeout,
            name=self.client_name,
        )
        self._connected_to = _host_of(link.nc.connected_url)
        return link

    def _others_first(self) -> None:
        """Move the server of the lost connection to the end of the list.

        When it went away (killed, paused, restarting), the others answer sooner than it does.
        """
        lost = self._connected_to
        if lost and len(self.urls) > 1:
            self.urls.sort(key=lambda url: _host_of(url) == lost)

    async def _check_jetstream(self, link: Link) -> None:
        diagnostics = self.diagnostics
        try:
            await admin.account_info(link)
        except NoResponders:
            raise SourceError(diagnostics.js_disabled_text()) from None
        except JsApiError as exc:
            if exc.err_code in JS_NOT_ENABLED_CODES:
                raise SourceError(diagnostics.js_disabled_text(account=True)) from None
            raise diagnostics.error(exc, "read the JetStream account") from None
        except PermissionViolation as exc:
            # Users scoped to one stream may not read account info; the stream calls will tell.
            if exc.kind == "subscribe":
                raise diagnostics.error(exc, "reach JetStream") from None
        except TransportError as exc:
            raise diagnostics.error(exc, "reach JetStream") from None

    async def ensure(self) -> Link:
        """The open connection; reconnects (one attempt) if it was lost.

        Raises:
            ConnectionLost: The attempt failed in a way that may pass (server down, restarting).
            SourceError: The server refused the credentials or TLS: trying again will not help.
        """
        link = self.link
        if link is not None and link.is_open:
            return link
        if link is not None:
            await link.close()
            self._others_first()
        self.link = None
        try:
            self.link = await self._connect()
        except SourceError as exc:
            if not exc.retryable:
                raise
            raise ConnectionLost(str(exc)) from None
        self.reconnects += 1
        logger.info("reconnected to NATS at %s", self.diagnostics.hosts)
        return self.link

    async def ensure_or_fail(self, doing: str) -> Link:
        """:meth:`ensure`, a failed reconnect raised as a (retryable) :class:`SourceError`."""
        try:
            return await self.ensure()
        except ConnectionLost as exc:
            raise SourceError(redact(str(exc)), retryable=True) from None

    async def drop_if_dead(self, link: Link) -> None:
        """Close a connection that no longer answers a PING, so the next attempt reconnects.

        nats-py notices a half-open connection (a server gone without a TCP reset) only after
        minutes of unanswered pings; a pull that stopped hearing from the server checks now.
        """
        if not link.is_open:
            return
        try:
            await asyncio.wait_for(link.nc.flush(), min(2.0, self.connect_timeout))
        except Exception:  # any failure means the same: this connection is of no use
            logger.info(
                "the connection to NATS at %s does not answer; reconnecting", self.diagnostics.hosts
            )
            await link.close(timeout=0.5)


def _host_of(url: object) -> str | None:
    """``host:port`` of a server URL (text or parsed), credentials dropped."""
    if url is None:
        return None
    parsed = url if hasattr(url, "netloc") else urlparse(str(url))
    return str(parsed.netloc).rsplit("@", 1)[-1].lower() or None  # type: ignore[attr-defined]
