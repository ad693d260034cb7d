"""The JetStream source of a pipeline: connection, consumers, fast pull, stream state and lag.

The engine drives it; everything position-related is decided by the engine from the Delta table,
so this class only guarantees that what it yields is in stream order, starts where asked and
never repeats a sequence.
"""

import asyncio
import contextlib
import logging
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from nilus_dagster.errors import PositionError, SourceError
from nilus_dagster.jetstream.connection import (
    ConnectionLost,
    JsApiError,
    Link,
    NoResponders,
    PermissionViolation,
    RequestTimeout,
    connect,
    hosts_text,
    is_auth_failure,
    server_urls,
)
from nilus_dagster.jetstream.consumers import (
    ConsumerSpec,
    create_subject,
    durable_config,
    misalignment,
    new_ephemeral_name,
    next_sequence,
    position_only,
    probe_config,
    reader_config,
    resettable,
    verify_created,
)
from nilus_dagster.jetstream.pull import API_PREFIX, BulkPuller, PullInterrupted, parse_ack_reply
from nilus_dagster.jetstream.state import StreamState, format_time, parse_time, subject_in
from nilus_dagster.manifest.address import NatsAddress
from nilus_dagster.messages import MessageBatch
from nilus_dagster.redaction import redact

logger = logging.getLogger(__name__)

# JetStream API error codes we act on.
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_CONSUMER_START_CHANGED = 10012  # a durable of that name exists with another start
ERR_NO_MESSAGE = 10037
ERR_JS_NOT_ENABLED_ACCOUNT = 10039
ERR_JS_NOT_ENABLED = 10076
ERR_FILTER_NOT_IN_STREAM = 10093

# Errors worth retrying while recovering from a lost connection or a restarting server.
_TRANSIENT = (ConnectionLost, RequestTimeout, NoResponders, PullInterrupted)


class _Recovery:
    """A time budget for getting a pull going again after a failure."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.since: float | None = None
        self.problem = ""

    def failed(self, problem: str, after_seq: int) -> None:
        if self.since is None:
            self.since = time.monotonic()
            logger.warning("%s; resuming after sequence %d", redact(problem), after_seq)
        else:
            logger.debug("still failing: %s", redact(problem))
        self.problem = problem

    def ok(self) -> None:
        if self.since is not None:
            logger.info("pull resumed after %.1fs", time.monotonic() - self.since)
        self.since = None

    @property
    def exhausted(self) -> bool:
        return self.since is not None and time.monotonic() - self.since > self.seconds


class JetStreamSource:
    """One pipeline's view of a JetStream stream, for the length of a run (or a sensor tick).

    Use it as an async context manager::

        async with JetStreamSource(address, "orders") as source:
            state = await source.stream_state()
            await source.align_durable(position + 1)
            async for batch in source.messages(position + 1):
                ...  # commit the batch, then:
                await source.mark_committed(batch.last_seq)

    Messages are always read through a consumer of the run's own, created at the requested
    sequence. A durable consumer named in the address is not read from: it mirrors the
    committed position (:meth:`align_durable`, :meth:`mark_committed`), so ``nats consumer
    info`` shows the table's view. Two runs reading one durable would split its deliveries
    between them, and a reset by one restarts the other's delivery numbering, so neither
    could tell that it missed messages.

    Args:
        address: The pipeline's address, placeholders already filled.
        stream: The stream name (``source_table``).
        servers: Replaces ``address.servers`` (``host:port`` or URLs): a deployment override.
        connect_timeout: Seconds for one connection attempt, and for one API request.
        reconnect_time_wait: Pause between reconnection attempts.
        max_reconnect_seconds: How long a pull tries to recover from a lost connection or
            consumer before it gives up with :class:`SourceError`.
        inactive_threshold: Seconds after which the server deletes an ephemeral consumer nobody
            pulls from; longer than the slowest commit.
        client_name: Connection name shown by the server's monitoring.
    """

    def __init__(
        self,
        address: NatsAddress,
        stream: str,
        *,
        servers: Sequence[str] | None = None,
        connect_timeout: float = 5.0,
        reconnect_time_wait: float = 0.5,
        max_reconnect_seconds: float = 30.0,
        inactive_threshold: float = 60.0,
        client_name: str = "nilus-dagster",
    ):
        if not stream or any(c in stream for c in " .*>"):
            raise SourceError(
                f"source_table {stream!r} is not a valid JetStream stream name "
                "(no spaces, '.', '*' or '>')"
            )
        self.address = address
        self.stream = stream
        self.subject = address.subject
        self.urls = server_urls(address, servers)
        self.connect_timeout = connect_timeout
        self.reconnect_time_wait = reconnect_time_wait
        self.max_reconnect_seconds = max_reconnect_seconds
        self.client_name = client_name
        self.spec = ConsumerSpec(
            stream=stream,
            subject=address.subject,
            durable=address.durable,
            ack_policy=address.ack_policy if address.durable else "none",
            inactive_threshold=inactive_threshold,
        )
        self._link: Link | None = None
        self._ephemerals: set[str] = set()
        self._pullers: set[BulkPuller] = set()
        self.realign_reasons: list[str] = []
        self.reconnects = 0
        self._checked = False
        # Creation time of the stream as first seen: every consumer must be made on that stream.
        self._created: datetime | None = None

    # -- context -------------------------------------------------------------------------------

    async def __aenter__(self) -> "JetStreamSource":
        self._link = await self._connect()
        try:
            await self._check_jetstream(self._link)
        except BaseException:
            await self._link.close()
            self._link = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for puller in list(self._pullers):
            await puller.stop()
        self._pullers.clear()
        link = self._link
        if link is not None and link.is_open:
            for name in list(self._ephemerals):
                await self._delete_consumer(link, name)
        self._ephemerals.clear()
        if link is not None:
            await link.close()
        self._link = None

    @property
    def realigned(self) -> bool:
        """Whether a durable consumer had to be moved to the requested start this session."""
        return bool(self.realign_reasons)

    @property
    def hosts(self) -> str:
        """``host:port`` of each server, credentials dropped: for messages and logs."""
        return hosts_text(self.urls)

    # -- connection ----------------------------------------------------------------------------

    async def _connect(self) -> Link:
        return await connect(
            self.address,
            self.urls,
            connect_timeout=self.connect_timeout,
            request_timeout=self.connect_timeout,
            name=self.client_name,
        )

    async def _check_jetstream(self, link: Link) -> None:
        try:
            await link.api(f"{API_PREFIX}.INFO")
        except NoResponders:
            raise SourceError(self._js_disabled_text()) from None
        except JsApiError as exc:
            if exc.err_code in (ERR_JS_NOT_ENABLED_ACCOUNT, ERR_JS_NOT_ENABLED):
                raise SourceError(self._js_disabled_text(account=True)) from None
            raise self._error(exc, "read the JetStream account") from None
        except PermissionViolation as exc:
            # Users scoped to one stream may not read account info; the stream calls will tell.
            if exc.kind == "subscribe":
                raise self._error(exc, "reach JetStream") from None
        except (RequestTimeout, ConnectionLost) as exc:
            raise self._error(exc, "reach JetStream") from None

    def _js_disabled_text(self, account: bool = False) -> str:
        if account:
            return (
                f"JetStream is not enabled for this account at {self.hosts}: enable JetStream "
                "for the account in the server's accounts configuration"
            )
        return (
            f"JetStream is not enabled at {self.hosts} (nothing answers the JetStream API): "
            "start nats-server with -js, or add a jetstream {} block to its configuration"
        )

    async def _ensure_link(self) -> Link:
        """The open connection; reconnects (one attempt) if it was lost."""
        link = self._link
        if link is not None and link.is_open:
            return link
        if link is not None:
            await link.close()
        self._link = None
        try:
            self._link = await self._connect()
        except SourceError as exc:
            if is_auth_failure(str(exc)):
                raise
            raise ConnectionLost(str(exc)) from None
        self.reconnects += 1
        logger.info("reconnected to NATS at %s", self.hosts)
        return self._link

    async def _drop_link_if_dead(self, link: Link) -> None:
        """Close a connection that no longer answers a PING, so the next attempt reconnects.

        nats-py notices a half-open connection (a server gone without a TCP reset) only after
        minutes of unanswered pings; a pull that stopped hearing from the server checks now.
        """
        if not link.is_open:
            return
        try:
            await asyncio.wait_for(link.nc.flush(), min(2.0, self.connect_timeout))
        except Exception:  # any failure means the same: this connection is of no use
            logger.info("the connection to NATS at %s does not answer; reconnecting", self.hosts)
            await link.close(timeout=0.5)

    # -- errors --------------------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str) -> SourceError:
        """Turn a low-level failure into a :class:`SourceError` that says what to do."""
        return SourceError(redact(self._error_text(exc, doing)))

    def _error_text(self, exc: BaseException, doing: str) -> str:
        stream, subject = self.stream, self.subject
        if isinstance(exc, SourceError):
            return str(exc)
        if isinstance(exc, PermissionViolation):
            return self._permission_text(exc)
        if isinstance(exc, JsApiError):
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                return self._missing_stream_text()
            if exc.err_code in (ERR_JS_NOT_ENABLED_ACCOUNT, ERR_JS_NOT_ENABLED):
                return self._js_disabled_text(account=exc.err_code == ERR_JS_NOT_ENABLED_ACCOUNT)
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

    def _permission_text(self, violation: PermissionViolation) -> str:
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

    def _missing_stream_text(self) -> str:
        return (
            f"no responders available for stream {self.stream}: the stream named in "
            f"source_table ({self.stream}) does not exist on NATS at {self.hosts}: create it "
            f"(e.g. nats stream add {self.stream} --subjects '{self.subject}') or fix "
            f"source_table{self._stream_list_suffix}"
        )

    _stream_list_suffix = ""

    async def _note_streams(self, link: Link) -> None:
        # Listing the streams that do exist makes a typo in source_table obvious.
        try:
            answer = await link.api(f"{API_PREFIX}.STREAM.NAMES", {"offset": 0})
        except Exception:  # a best-effort hint only
            return
        names = sorted(answer.get("streams") or [])
        if names:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            self._stream_list_suffix = f"; streams there: {shown}"
        else:
            self._stream_list_suffix = "; the server has no streams"

    async def _api(self, subject: str, body: dict[str, Any] | None, doing: str) -> dict[str, Any]:
        """An API call on the current connection, failures translated to SourceError."""
        link = await self._ensure_link_or_fail(doing)
        return await self._call(link, subject, body, doing)

    async def _call(
        self, link: Link, subject: str, body: dict[str, Any] | None, doing: str
    ) -> dict[str, Any]:
        """An API call on ``link``, failures translated to SourceError."""
        try:
            return await link.api(subject, body)
        except JsApiError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                await self._note_streams(link)
            raise self._error(exc, doing) from None
        except NoResponders as exc:
            raise await self._no_responders_error(link, exc, doing) from None
        except (PermissionViolation, RequestTimeout, ConnectionLost) as exc:
            raise self._error(exc, doing) from None

    async def _ensure_link_or_fail(self, doing: str) -> Link:
        try:
            return await self._ensure_link()
        except ConnectionLost as exc:
            raise SourceError(redact(str(exc))) from None

    async def _no_responders_error(self, link: Link, exc: NoResponders, doing: str) -> SourceError:
        # Nobody answers: either JetStream is off, or (older servers) the stream is missing.
        try:
            await link.api(f"{API_PREFIX}.INFO")
        except NoResponders:
            return SourceError(redact(self._js_disabled_text()))
        except Exception:  # fall through to the stream explanation
            pass
        return self._error(exc, doing)

    # -- stream state --------------------------------------------------------------------------

    async def stream_state(self) -> StreamState:
        """The stream's first/last sequence, message count, creation time and subjects.

        Raises:
            SourceError: The stream does not exist, JetStream is off, permission is missing...
        """
        info = await self._api(
            f"{API_PREFIX}.STREAM.INFO.{self.stream}", None, "read the stream info"
        )
        state = StreamState.from_info(info)
        if self._created is None:
            self._created = state.created
        return state

    async def _check_same_stream(self, last: int) -> None:
        """Refuse to read on if the stream was deleted and recreated since it was first seen.

        A recreated stream numbers its messages from 1 again; a consumer recreated after a
        lost one would read the new stream's messages past ``last`` as if they continued the
        old one.
        """
        created = self._created
        state = await self.stream_state()
        if created is None or state.created == created:
            return
        raise PositionError(
            redact(
                f"stream {self.stream} was deleted and recreated while this run was reading it "
                f"(created {created.isoformat()}, now {state.created.isoformat()}): nothing "
                f"after sequence {last} was read, so the new stream's messages were not taken "
                "for the old one's. What was committed before stays; to ingest the new stream, "
                "write to a new dest_table, or delete the table"
            )
        )

    async def check_subject(self, state: StreamState | None = None) -> None:
        """Check that the subject is bound to the stream and that the user may subscribe to it.

        Args:
            state: The stream's state if the caller just read it (saves a second request).

        Raises:
            SourceError: The stream has no subject the pipeline's subject falls under (the
                message lists the stream's subjects), or the user may not subscribe to it.
        """
        if state is None:
            state = await self.stream_state()
        if state.subjects and not subject_in(self.subject, state.subjects):
            raise SourceError(
                redact(
                    f"subject {self.subject} is not bound to stream {self.stream}: the stream's "
                    f"subjects are {', '.join(state.subjects)}; fix subject= in the address, or "
                    f"add {self.subject} to the stream's subjects"
                )
            )
        link = await self._ensure_link_or_fail("check the subject")
        try:
            await link.check_subscribe(self.subject)
        except (PermissionViolation, RequestTimeout) as exc:
            raise self._error(exc, "subscribe to the subject") from None
        self._checked = True

    async def pending_after(self, position: int) -> int:
        """Messages on the subject with a sequence above ``position`` (exact, filters included)."""
        info = await self._probe(
            probe_config(self.subject, new_ephemeral_name("nilus_lag"), start_seq=position + 1),
            "count the pending messages",
        )
        return int(info.get("num_pending", 0) or 0)

    async def last_message_time(self) -> datetime | None:
        """When the newest message on the subject was stored, or ``None`` if there is none."""
        doing = "read the newest message on the subject"
        link = await self._ensure_link_or_fail(doing)
        try:
            answer = await link.api(
                f"{API_PREFIX}.STREAM.MSG.GET.{self.stream}", {"last_by_subj": self.subject}
            )
            return parse_time(str(answer["message"]["time"]))
        except JsApiError as exc:
            if exc.err_code == ERR_NO_MESSAGE:
                return None
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                raise self._error(exc, doing) from None
        except PermissionViolation as exc:
            if exc.kind == "subscribe":
                raise self._error(exc, doing) from None
        except (NoResponders, RequestTimeout, ConnectionLost) as exc:
            raise self._error(exc, doing) from None
        # Direct reads refused: a consumer that delivers only the last message tells as well.
        return await self._last_time_by_consumer(doing)

    async def _last_time_by_consumer(self, doing: str) -> datetime | None:
        name = new_ephemeral_name("nilus_last")
        link = await self._ensure_link_or_fail(doing)
        info = await self._create_consumer(link, probe_config(self.subject, name, last=True), doing)
        try:
            if not int(info.get("num_pending", 0) or 0):
                return None
            msg = await link.request(
                f"{API_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{name}",
                b'{"batch":1,"no_wait":true}',
            )
            if not msg.reply:
                return None
            meta = parse_ack_reply(msg.reply)
            return parse_time_ns(meta.timestamp_ns)
        except (PermissionViolation, NoResponders, RequestTimeout, ConnectionLost) as exc:
            raise self._error(exc, doing) from None
        finally:
            await self._delete_consumer(link, name)

    async def _probe(self, config: dict[str, Any], doing: str) -> dict[str, Any]:
        """Create a throwaway consumer, return its info, delete it."""
        link = await self._ensure_link_or_fail(doing)
        info = await self._create_consumer(link, config, doing)
        await self._delete_consumer(link, config["name"])
        return info

    async def _create_consumer(
        self, link: Link, config: dict[str, Any], doing: str
    ) -> dict[str, Any]:
        subject = create_subject(self.stream, config["name"], self.subject)
        body = {"stream_name": self.stream, "config": config}
        return await self._call(link, subject, body, doing)

    async def _delete_consumer(self, link: Link, name: str) -> None:
        # Best effort: an ephemeral we fail to delete goes away after inactive_threshold.
        self._ephemerals.discard(name)
        if not link.is_open:
            return
        with contextlib.suppress(Exception):
            await link.api(
                f"{API_PREFIX}.CONSUMER.DELETE.{self.stream}.{name}",
                None,
                timeout=min(2.0, self.connect_timeout),
            )

    async def _seq_for_time(self, start_time: datetime) -> int:
        """The first stream sequence stored at or after ``start_time``."""
        info = await self._probe(
            probe_config(
                self.subject, new_ephemeral_name("nilus_time"), start_time=format_time(start_time)
            ),
            "find the first message after start_time",
        )
        return next_sequence(info)

    # -- consumers -----------------------------------------------------------------------------

    async def _open_reader(self, link: Link, start_seq: int) -> tuple[str, dict[str, Any]]:
        """A consumer of this run's own, ready to deliver from ``start_seq``: (name, info)."""
        name = new_ephemeral_name()
        config = reader_config(self.spec, name, start_seq)
        info = await self._create_consumer(link, config, "create the consumer")
        self._ephemerals.add(name)
        verify_created(config, info, server=self._version(link))
        return name, info

    async def align_durable(self, start_seq: int, *, start_time: datetime | None = None) -> None:
        """Move the address's durable consumer to ``start_seq`` (or ``start_time``) if it is
        elsewhere, and create it if it does not exist; nothing without a durable.

        A durable that had to move is recorded in :attr:`realigned` and
        :attr:`realign_reasons`. Call it once at the start of a run, with the table's position.

        Raises:
            SourceError: The durable cannot be read, created or moved (permissions, stream).
        """
        if self.spec.durable is None:
            return
        if start_time is not None:
            start_seq = await self._seq_for_time(start_time)
        link = await self._ensure_link_or_fail(f"align durable consumer {self.spec.durable}")
        await self._align_durable(link, start_seq)

    async def mark_committed(self, seq: int) -> None:
        """Move the durable consumer to just after ``seq``, now in the table; nothing without
        a durable.

        A failure is logged, not raised: the data is committed, the table holds the position,
        and the next run realigns the durable.
        """
        name = self.spec.durable
        link = self._link
        if name is None:
            return
        if link is None or not link.is_open:
            logger.warning(
                "could not move durable consumer %s past sequence %d: not connected", name, seq
            )
            return
        try:
            await self._move_durable(link, seq + 1)
        except Exception as exc:  # the data is committed; only the mirror is behind
            logger.warning(
                "could not move durable consumer %s past sequence %d: %s",
                name,
                seq,
                redact(str(exc)),
            )

    def _version(self, link: Link) -> str:
        return ".".join(map(str, link.server_version))

    async def _align_durable(self, link: Link, start_seq: int) -> None:
        name = self.spec.durable
        assert name is not None
        doing = f"read durable consumer {name}"
        try:
            info: dict[str, Any] | None = await link.api(
                f"{API_PREFIX}.CONSUMER.INFO.{self.stream}.{name}"
            )
        except JsApiError as exc:
            if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                if exc.err_code == ERR_STREAM_NOT_FOUND:
                    await self._note_streams(link)
                raise self._error(exc, doing) from None
            info = None
        except NoResponders as exc:
            raise await self._no_responders_error(link, exc, doing) from None
        except (PermissionViolation, RequestTimeout, ConnectionLost) as exc:
            raise self._error(exc, doing) from None

        if info is not None:
            reason = misalignment(info, self.spec, start_seq)
            if (
                reason is not None
                and position_only(reason)
                and await self._nothing_between(link, info, start_seq)
            ):
                reason = None
            if reason is None:
                return
            self.realign_reasons.append(reason)
            logger.warning(
                "durable consumer %s on stream %s realigned to sequence %d: %s",
                name,
                self.stream,
                start_seq,
                reason,
            )
            await self._move_durable(link, start_seq, info)
            return
        await self._recreate_durable(link, start_seq, exists=False)

    async def _move_durable(
        self, link: Link, start_seq: int, info: dict[str, Any] | None = None
    ) -> None:
        """Put the existing durable at ``start_seq``: reset in place where the server (2.14+)
        and its settings (``info``, when known) allow, else delete and recreate it."""
        if (info is None or resettable(info, self.spec)) and await self._reset_durable(
            link, start_seq
        ):
            return
        if info is None and link.server_version >= (2, 14, 0):
            # (A realignment logged its reason already.)
            logger.warning(
                "durable consumer %s could not be reset to sequence %d in place (were its "
                "settings changed?); recreating it",
                self.spec.durable,
                start_seq,
            )
        await self._recreate_durable(link, start_seq)

    async def _recreate_durable(self, link: Link, start_seq: int, *, exists: bool = True) -> None:
        """Delete the durable (when it exists) and create it at ``start_seq``."""
        name = self.spec.durable
        assert name is not None
        config = durable_config(self.spec, start_seq)
        subject = create_subject(self.stream, name, self.subject)
        for attempt in (1, 2):
            if exists or attempt == 2:
                await self._delete_durable(link)
            try:
                created = await link.api(subject, {"stream_name": self.stream, "config": config})
            except JsApiError as exc:
                if exc.err_code == ERR_CONSUMER_START_CHANGED and attempt == 1:
                    # Another run made it between our delete and create (on 2.9 every run
                    # moves the durable this way after each commit): replace it once more.
                    continue
                raise self._error(exc, f"create durable consumer {name}") from None
            except (PermissionViolation, NoResponders, RequestTimeout, ConnectionLost) as exc:
                raise self._error(exc, f"create durable consumer {name}") from None
            verify_created(config, created, server=self._version(link))
            return

    async def _delete_durable(self, link: Link) -> None:
        doing = f"delete durable consumer {self.spec.durable} to realign it"
        try:
            await link.api(f"{API_PREFIX}.CONSUMER.DELETE.{self.stream}.{self.spec.durable}")
        except JsApiError as exc:
            if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                raise self._error(exc, doing) from None
        except (PermissionViolation, NoResponders, RequestTimeout, ConnectionLost) as exc:
            raise self._error(exc, doing) from None

    async def _nothing_between(self, link: Link, info: dict[str, Any], start_seq: int) -> bool:
        """Whether no message of the subject lies between ``start_seq`` and the durable's next
        sequence, so that reading from either gives the same messages.

        The durable's pending count covers the subject from its next sequence on; a probe
        counts it from ``start_seq`` on. Equal counts: only other subjects (or nothing) lie in
        between, which happens when a filtered consumer moved past them (2.9 does).
        """
        probe = probe_config(self.subject, new_ephemeral_name("nilus_align"), start_seq=start_seq)
        try:
            counted = await link.api(
                create_subject(self.stream, probe["name"], self.subject),
                {"stream_name": self.stream, "config": probe},
            )
        except (JsApiError, NoResponders, RequestTimeout, PermissionViolation, ConnectionLost):
            return False
        finally:
            await self._delete_consumer(link, probe["name"])
        return int(counted.get("num_pending", -1)) == int(info.get("num_pending", -2))

    async def _reset_durable(self, link: Link, start_seq: int) -> dict[str, Any] | None:
        """Move the durable in place (nats-server 2.14+): its info, or ``None`` if not possible."""
        if link.server_version < (2, 14, 0):
            return None
        try:
            after = await link.api(
                f"{API_PREFIX}.CONSUMER.RESET.{self.stream}.{self.spec.durable}",
                {"seq": max(1, start_seq)},
            )
        except (JsApiError, NoResponders, RequestTimeout, PermissionViolation):
            return None
        if misalignment(after, self.spec, start_seq) is not None:
            return None
        return after

    # -- pulling -------------------------------------------------------------------------------

    async def messages(
        self,
        start_seq: int,
        *,
        stop_at_seq: int | None = None,
        max_messages: int | None = None,
        start_time: datetime | None = None,
    ) -> AsyncIterator[MessageBatch]:
        """Yield the subject's messages from ``start_seq`` (or ``start_time``), in stream order.

        Every batch holds strictly increasing sequences above anything yielded before. Pulls of
        ``address.batch_size`` stay in flight while the caller handles a batch. Stops after
        ``stop_at_seq`` (messages after it are not yielded), after ``max_messages`` (the last
        batch is trimmed), or when the consumer has nothing more pending. A lost connection
        or consumer (server restart, inactivity) is recovered by reconnecting and recreating
        the consumer after the last yielded sequence, within ``max_reconnect_seconds``.

        Raises:
            SourceError: The stream, subject, permissions or server make reading impossible,
                or recovery did not succeed in time.
        """
        if max_messages is not None and max_messages <= 0:
            return
        if not self._checked:
            await self.check_subject()
        if start_time is not None:
            start_seq = await self._seq_for_time(start_time)
        last = max(1, start_seq) - 1
        if stop_at_seq is not None and stop_at_seq <= last:
            return
        yielded = 0
        recovery = _Recovery(self.max_reconnect_seconds)
        puller: BulkPuller | None = None
        consumer: str | None = None
        link: Link | None = None
        refused: list[PermissionViolation] = []

        def on_link_event(what: str, detail: BaseException | None) -> None:
            if puller is None:
                return
            if what == "closed":
                puller.interrupt("the connection to NATS closed", connection_lost=True)
            elif isinstance(detail, PermissionViolation):
                if detail.on_inbox:
                    refused.append(detail)
                elif detail.kind == "publish" and detail.about(puller.request_subject):
                    refused.append(PermissionViolation("publish", puller.request_subject))
                else:
                    return
                puller.interrupt(str(detail), fatal=True)

        async def drop_puller() -> None:
            nonlocal puller, consumer
            if puller is not None:
                self._pullers.discard(puller)
                await puller.stop()
                puller = None
            if link is not None:
                link.unlisten(on_link_event)
                if consumer is not None:
                    await self._delete_consumer(link, consumer)
            consumer = None

        try:
            while True:
                wanted: int | None = None
                if max_messages is not None:
                    wanted = max_messages - yielded
                if stop_at_seq is not None:
                    # Sequences are unique, so this many messages at most remain to be read.
                    wanted = min(wanted, stop_at_seq - last) if wanted else stop_at_seq - last
                if wanted is not None and wanted <= 0:
                    return
                try:
                    if puller is None:
                        link = await self._ensure_link()
                        consumer, info = await self._open_reader(link, last + 1)
                        # After the consumer exists: a stream recreated later deletes it,
                        # and the recovery that follows comes back here.
                        await self._check_same_stream(last)
                        if not int(info.get("num_pending", 0) or 0):
                            return
                        delivered = info.get("delivered") or {}
                        puller = BulkPuller(
                            link.nc,
                            self.stream,
                            consumer,
                            batch_size=self.address.batch_size,
                            expires=self.address.timeout,
                            after_seq=last,
                            next_consumer_seq=int(delivered.get("consumer_seq", 0) or 0) + 1,
                        )
                        link.listen(on_link_event)
                        self._pullers.add(puller)
                        await puller.start()
                    batch = await puller.next_batch(wanted)
                except _TRANSIENT as exc:
                    if refused:
                        raise self._error(refused[0], "pull messages") from None
                    if isinstance(exc, PullInterrupted) and exc.fatal:
                        raise self._error(exc, "pull messages") from None
                    recovery.failed(self._error_text(exc, "pull messages"), last)
                    await drop_puller()
                    if link is not None and not getattr(exc, "connection_lost", False):
                        await self._drop_link_if_dead(link)
                    if recovery.exhausted:
                        raise SourceError(
                            redact(
                                f"could not resume pulling from stream {self.stream} at "
                                f"{self.hosts} within {self.max_reconnect_seconds:g}s: "
                                f"{recovery.problem}"
                            )
                        ) from None
                    await asyncio.sleep(self.reconnect_time_wait)
                    continue
                except SourceError as exc:
                    # A restarting server may answer "JetStream unavailable" for a moment.
                    if recovery.since is None or not _looks_transient(str(exc)):
                        raise
                    recovery.failed(str(exc), last)
                    await drop_puller()
                    if link is not None:
                        await self._drop_link_if_dead(link)
                    if recovery.exhausted:
                        raise
                    await asyncio.sleep(self.reconnect_time_wait)
                    continue
                recovery.ok()
                if not batch:
                    return  # a pull waited the whole timeout and got nothing
                done = False
                if stop_at_seq is not None and batch.last_seq >= stop_at_seq:
                    batch, done = batch.split(bisect_right(batch.sequences, stop_at_seq))[0], True
                if max_messages is not None and yielded + len(batch) >= max_messages:
                    batch, done = batch.split(max_messages - yielded)[0], True
                if batch:
                    last = batch.last_seq
                    yielded += len(batch)
                    yield batch
                if done or batch.num_pending == 0:
                    return
        finally:
            await drop_puller()


def parse_time_ns(ns: int) -> datetime:
    """Nanoseconds since the epoch as an aware UTC datetime."""
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)


def _looks_transient(text: str) -> bool:
    lowered = text.lower()
    return any(
        word in lowered
        for word in (
            "temporarily unavailable",
            "not answering",
            "no answer",
            "lost the connection",
            "cannot reach",
            "not enabled",
        )
    )
