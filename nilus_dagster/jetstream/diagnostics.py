"""Messages for a person: what a failed JetStream call means for this stream, and what to do.

:class:`Diagnostics` turns the transport's typed errors
(:mod:`nilus_dagster.jetstream.errors`) into :class:`~nilus_dagster.errors.SourceError` texts
that name the stream, the subject, the servers and the fix. Whether the failure is worth
retrying travels along as :attr:`SourceError.retryable`, decided by the error's type.
"""

from collections.abc import Awaitable
from typing import TypeVar

from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream import admin
from nilus_dagster.jetstream.admin import API_PREFIX
from nilus_dagster.jetstream.connection import Link
from nilus_dagster.jetstream.errors import (
    ERR_FILTER_NOT_IN_STREAM,
    ERR_JS_NOT_ENABLED_ACCOUNT,
    ERR_STREAM_NOT_FOUND,
    JS_NOT_ENABLED_CODES,
    ConnectionLost,
    JsApiError,
    NoResponders,
    PermissionViolation,
    PullInterrupted,
    RequestTimeout,
    TransportError,
)
from nilus_dagster.redaction import redact

T = TypeVar("T")

_STREAMS_SHOWN = 20


class Diagnostics:
    """Explains failures on one stream and subject, at the given servers.

    Args:
        stream: The stream name (``source_table``).
        subject: The pipeline's subject.
        hosts: ``host:port`` of each server, credentials dropped.
    """

    def __init__(self, stream: str, subject: str, hosts: str):
        self.stream = stream
        self.subject = subject
        self.hosts = hosts
        # Filled by note_streams: the streams that do exist, to make a typo obvious.
        self._stream_list_suffix = ""

    def error(self, exc: BaseException, doing: str) -> SourceError:
        """Turn a low-level failure into a :class:`SourceError` that says what to do."""
        retryable = isinstance(exc, TransportError | SourceError) and exc.retryable
        return SourceError(redact(self.error_text(exc, doing)), retryable=retryable)

    def error_text(self, exc: BaseException, doing: str) -> str:
        """The text of :meth:`error` (not redacted)."""
        stream, subject = self.stream, self.subject
        if isinstance(exc, SourceError):
            return str(exc)
        if isinstance(exc, PermissionViolation):
            return self.permission_text(exc)
        if isinstance(exc, JsApiError):
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                return self.missing_stream_text()
            if exc.err_code in JS_NOT_ENABLED_CODES:
                return self.js_disabled_text(account=exc.err_code == ERR_JS_NOT_ENABLED_ACCOUNT)
            if exc.err_code == ERR_FILTER_NOT_IN_STREAM:
                return f"subject {subject} is not bound to stream {stream}: {exc.description}"
            return f"JetStream refused to {doing} on stream {stream}: {exc.description}"
        if isinstance(exc, NoResponders):
            return (
                f"no responders available for stream {stream} at {self.hosts} while trying to "
                f"{doing}: JetStream is not answering there"
            )
        if isinstance(exc, RequestTimeout):
            return (
                f"no answer from JetStream at {self.hosts} within {exc.timeout:g}s while trying "
                f"to {doing} (stream {stream}): is the server overloaded or stuck?"
            )
        if isinstance(exc, ConnectionLost):
            # Its text already says which server and why (closed, refused, no answer...).
            return str(exc)
        if isinstance(exc, PullInterrupted):
            return f"the pull from stream {stream} stopped: {exc.reason}"
        return f"could not {doing} on stream {stream} at {self.hosts}: {exc}"

    def js_disabled_text(self, account: bool = False) -> str:
        """JetStream is off on the server (or for the account)."""
        if account:
            return (
                f"JetStream is not enabled for this account at {self.hosts}: enable JetStream "
                "for the account in the server's accounts configuration"
            )
        return (
            f"JetStream is not enabled at {self.hosts} (nothing answers the JetStream API): "
            "start nats-server with -js, or add a jetstream {} block to its configuration"
        )

    def permission_text(self, violation: PermissionViolation) -> str:
        """Which permission the NATS user lacks, and what to allow."""
        what = violation.subject
        if violation.kind == "subscribe":
            if violation.on_inbox:
                return (
                    "permissions violation: the NATS user may not subscribe to reply inboxes, "
                    "where JetStream answers and pulled messages arrive: allow subscribe on "
                    "_INBOX.>"
                )
            return (
                f"permissions violation: the NATS user may not subscribe to the subject {what}: "
                f"allow subscribe on {what} (and JetStream API access on stream {self.stream})"
            )
        if what.startswith(f"{API_PREFIX}."):
            return (
                f"permissions violation: the NATS user may not use the JetStream API on stream "
                f"{self.stream} (publish to {what} was refused): allow publish on "
                f"$JS.API.STREAM.INFO.{self.stream}, $JS.API.CONSUMER.*.{self.stream}.> and "
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.> (or $JS.API.>), and subscribe on "
                f"the subject {self.subject}"
            )
        if what.startswith("$JS.ACK"):
            return (
                f"permissions violation: the NATS user may not acknowledge messages ({what}): "
                f"allow publish on $JS.ACK.{self.stream}.>"
            )
        return f"permissions violation: the NATS user may not publish to {what}"

    def missing_stream_text(self) -> str:
        """The stream does not exist (with the streams that do, once :meth:`note_streams` ran)."""
        return (
            f"no responders available for stream {self.stream}: the stream named in "
            f"source_table ({self.stream}) does not exist on NATS at {self.hosts}: create it "
            f"(e.g. nats stream add {self.stream} --subjects '{self.subject}') or fix "
            f"source_table{self._stream_list_suffix}"
        )

    async def note_streams(self, link: Link) -> None:
        """Remember the streams that exist, for :meth:`missing_stream_text` (best effort)."""
        try:
            names = await admin.stream_names(link)
        except Exception:  # a hint only
            return
        if names:
            shown = ", ".join(names[:_STREAMS_SHOWN])
            shown += " ..." if len(names) > _STREAMS_SHOWN else ""
            self._stream_list_suffix = f"; streams there: {shown}"
        else:
            self._stream_list_suffix = "; the server has no streams"

    async def no_responders_error(self, link: Link, exc: NoResponders, doing: str) -> SourceError:
        """Nobody answers: either JetStream is off, or (older servers) the stream is missing."""
        try:
            await admin.account_info(link)
        except NoResponders:
            return SourceError(redact(self.js_disabled_text()), retryable=True)
        except Exception:  # fall through to the stream explanation
            pass
        return self.error(exc, doing)

    async def call(self, link: Link, call: Awaitable[T], doing: str) -> T:
        """Await an API call on ``link``, its failures turned into :class:`SourceError`."""
        try:
            return await call
        except JsApiError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                await self.note_streams(link)
            raise self.error(exc, doing) from None
        except NoResponders as exc:
            raise await self.no_responders_error(link, exc, doing) from None
        except TransportError as exc:
            raise self.error(exc, doing) from None
