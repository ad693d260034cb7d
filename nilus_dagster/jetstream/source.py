"""The JetStream source of a pipeline: its messages in stream order, recovered after failures.

The engine drives it; everything position-related is decided by the engine from the Delta table,
so this class only guarantees that what it yields is in stream order, starts where asked and
never repeats a sequence. It delegates the rest: the connection to :mod:`.session`, the durable
consumer to :mod:`.durable`, questions about the stream to :mod:`.probes` and
:mod:`.gaps`, waiting out a failover to :mod:`.failover`, the current consumer and puller of a
read to :mod:`.reader`, the API calls to :mod:`.admin`, and the wording of failures to
:mod:`.diagnostics`.
"""

import asyncio
import logging
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import datetime
from types import TracebackType
from typing import TypeVar

from nats.js.api import ConsumerInfo

from nilus_dagster.errors import PositionError, SourceError
from nilus_dagster.jetstream import admin, gaps
from nilus_dagster.jetstream.connection import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    Link,
    hosts_text,
    server_urls,
)
from nilus_dagster.jetstream.consumers import (
    DEFAULT_INACTIVE_THRESHOLD_SECONDS,
    ConsumerSpec,
    new_ephemeral_name,
    next_delivery,
    pending,
    reader_config,
    verify_created,
)
from nilus_dagster.jetstream.diagnostics import Diagnostics
from nilus_dagster.jetstream.durable import DurableMirror, server_version_text
from nilus_dagster.jetstream.errors import (
    TransportError,
)
from nilus_dagster.jetstream.failover import Failover, PullRecovery
from nilus_dagster.jetstream.probes import Probes
from nilus_dagster.jetstream.pull import BulkPuller
from nilus_dagster.jetstream.reader import Reader
from nilus_dagster.jetstream.session import Session
from nilus_dagster.jetstream.state import StreamState, subject_in
from nilus_dagster.manifest.address import NatsAddress
from nilus_dagster.messages import MessageBatch
from nilus_dagster.redaction import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
        failover_timeout: How long a call or a pull keeps trying to get NATS back (a lost
            connection or consumer, a stream without a leader while the cluster elects one)
            before it gives up with :class:`SourceError`; the address's ``failover_timeout``
            by default.
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
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        reconnect_time_wait: float = 0.5,
        failover_timeout: float | None = None,
        inactive_threshold: float = DEFAULT_INACTIVE_THRESHOLD_SECONDS,
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
        self.failover_timeout = (
            address.failover_timeout if failover_timeout is None else failover_timeout
        )
        self.client_name = client_name
        self.spec = ConsumerSpec(
            stream=stream,
            subject=address.subject,
            durable=address.durable,
            ack_policy=address.ack_policy if address.durable else "none",
            inactive_threshold=inactive_threshold,
        )
        self.diagnostics = Diagnostics(stream, address.subject, hosts_text(self.urls))
        self._durable = (
            DurableMirror(self.spec, self.diagnostics, self._delete_timeout)
            if self.spec.durable is not None
            else None
        )
        self._session = Session(
            address,
            self.urls,
            self.diagnostics,
            connect_timeout=connect_timeout,
            client_name=client_name,
        )
        self._failover = Failover(
            self._session,
            self.diagnostics,
            timeout=self.failover_timeout,
            pause=reconnect_time_wait,
        )
        self._probes = Probes(stream, address.subject, self.diagnostics, self._delete_timeout)
        self._ephemerals: set[str] = set()
        self._pullers: set[BulkPuller] = set()
        self._checked = False
        # Creation time of the stream as first seen: every consumer must be made on that stream.
        self._created: datetime | None = None

    # -- context -------------------------------------------------------------------------------

    async def __aenter__(self) -> "JetStreamSource":
        await self._session.open()
        try:
            await self._failover.run("reach JetStream", self._session.check_jetstream)
        except BaseException:
            await self._session.close()
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
        link = self._session.link
        if link is not None and link.is_open:
            for name in list(self._ephemerals):
                await self._delete_consumer(link, name)
        self._ephemerals.clear()
        await self._session.close()

    @property
    def realign_reasons(self) -> list[str]:
        """Why the durable consumer had to be moved this session (empty: it was in place)."""
        return self._durable.realign_reasons if self._durable is not None else []

    @property
    def realigned(self) -> bool:
        """Whether a durable consumer had to be moved to the requested start this session."""
        return bool(self.realign_reasons)

    @property
    def reconnects(self) -> int:
        """How often the connection was made again this session."""
        return self._session.reconnects

    @property
    def hosts(self) -> str:
        """``host:port`` of each server, credentials dropped: for messages and logs."""
        return self.diagnostics.hosts

    @property
    def _delete_timeout(self) -> float:
        return min(2.0, self.connect_timeout)

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, link: Link, call: Awaitable[T], doing: str) -> T:
        """An API call on ``link``, failures translated to :class:`SourceError`."""
        return await self.diagnostics.call(link, call, doing)

    # -- stream state --------------------------------------------------------------------------

    async def stream_state(self) -> StreamState:
        """The stream's first/last sequence, message count, creation time and subjects.

        Raises:
            SourceError: The stream does not exist, JetStream is off, permission is missing...
        """
        doing = "read the stream info"
        state = await self._failover.run(
            doing, lambda link: self._call(link, admin.stream_info(link, self.stream), doing)
        )
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

        async def check(link: Link) -> None:
            try:
                await link.check_subscribe(self.subject)
            except TransportError as exc:
                raise self.diagnostics.error(exc, "subscribe to the subject") from None

        await self._failover.run("check the subject", check)
        self._checked = True

    async def pending_after(self, position: int) -> int:
        """Messages on the subject with a sequence above ``position`` (exact, filters included)."""
        return await self._failover.run(
            "count the pending messages",
            lambda link: self._probes.pending_after(link, position),
        )

    async def removed_after(self, position: int, state: StreamState) -> int:
        """Sequences after ``position`` that retention or a purge removed before they were read.

        From the front of the stream, or of the subject alone on a shared stream
        (:func:`~nilus_dagster.jetstream.gaps.removed_after`).

        Args:
            position: The last committed sequence.
            state: The stream's state, just read.
        """
        doing = "look for messages removed after the position"

        async def look(link: Link) -> int:
            try:
                return await gaps.removed_after(link, self.stream, self.subject, position, state)
            except TransportError as exc:
                if exc.retryable:
                    raise
                # Direct reads or unfiltered counting consumers refused: what the stream's
                # first sequence says is all that can be known.
                logger.info("per-subject gaps not checked (%s)", redact(str(exc)))
                return state.gap_after(position)

        return await self._failover.run(doing, look)

    async def last_message_time(self) -> datetime | None:
        """When the newest message on the subject was stored, or ``None`` if there is none."""
        return await self._failover.run(
            "read the newest message on the subject", self._probes.last_message_time
        )

    async def _seq_for_time(self, start_time: datetime) -> int:
        """The first stream sequence stored at or after ``start_time``."""
        return await self._failover.run(
            "find the first message after start_time",
            lambda link: self._probes.seq_for_time(link, start_time),
        )

    async def _delete_consumer(self, link: Link, name: str) -> None:
        # Best effort: an ephemeral we fail to delete goes away after inactive_threshold.
        self._ephemerals.discard(name)
        await self._probes.delete(link, name)

    # -- consumers -----------------------------------------------------------------------------

    async def _open_reader(self, link: Link, start_seq: int) -> tuple[str, ConsumerInfo]:
        """A consumer of this run's own, ready to deliver from ``start_seq``: (name, info)."""
        name = new_ephemeral_name()
        config = reader_config(self.spec, name, start_seq)
        info = await self._call(
            link, admin.create_consumer(link, self.stream, config), "create the consumer"
        )
        self._ephemerals.add(name)
        verify_created(config, info, server=server_version_text(link))
        return name, info

    async def align_durable(self, start_seq: int, *, start_time: datetime | None = None) -> None:
        """Move the address's durable consumer to ``start_seq`` (or ``start_time``).

        It is moved if it is elsewhere and created if it does not exist; without a durable in
        the address, nothing happens.

        A durable that had to move is recorded in :attr:`realigned` and
        :attr:`realign_reasons`. Call it once at the start of a run, with the table's position.

        Raises:
            SourceError: The durable cannot be read, created or moved (permissions, stream).
        """
        durable = self._durable
        if durable is None:
            return
        if start_time is not None:
            start_seq = await self._seq_for_time(start_time)
        await self._failover.run(
            f"align durable consumer {durable.name}", lambda link: durable.align(link, start_seq)
        )

    async def mark_committed(self, seq: int) -> None:
        """Move the durable consumer to just after ``seq``, now in the table.

        Nothing happens without a durable in the address.

        A failure is logged, not raised: the data is committed, the table holds the position,
        and the next run realigns the durable.
        """
        durable = self._durable
        link = self._session.link
        if durable is None:
            return
        name = durable.name
        if link is None or not link.is_open:
            logger.warning(
                "could not move durable consumer %s past sequence %d: not connected", name, seq
            )
            return
        try:
            await durable.move(link, seq + 1)
        except Exception as exc:  # the data is committed; only the mirror is behind
            logger.warning(
                "could not move durable consumer %s past sequence %d: %s",
                name,
                seq,
                redact(str(exc)),
            )

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
        the consumer after the last yielded sequence, within ``failover_timeout``.

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
        recovery = PullRecovery(self.failover_timeout)
        reader = Reader(self._pullers, self._delete_consumer)

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
                    if reader.puller is None:
                        link = reader.link = await self._session.ensure()
                        reader.consumer, info = await self._open_reader(link, last + 1)
                        # After the consumer exists: a stream recreated later deletes it,
                        # and the recovery that follows comes back here.
                        await self._check_same_stream(last)
                        if not pending(info):
                            return
                        puller = BulkPuller(
                            link.nc,
                            self.stream,
                            reader.consumer,
                            batch_size=self.address.batch_size,
                            expires=self.address.timeout,
                            after_seq=last,
                            next_consumer_seq=next_delivery(info),
                        )
                        await reader.start(puller)
                    batch = await reader.next_batch(wanted)
                except TransportError as exc:
                    if reader.refused:
                        raise self.diagnostics.error(reader.refused[0], "pull messages") from None
                    if not exc.retryable:
                        raise self.diagnostics.error(exc, "pull messages") from None
                    recovery.failed(self.diagnostics.error_text(exc, "pull messages"), last)
                    await reader.drop()
                    if reader.link is not None and not getattr(exc, "connection_lost", False):
                        await self._session.drop_if_dead(reader.link)
                    if recovery.exhausted:
                        raise recovery.gave_up(self.stream, self.hosts) from None
                    await asyncio.sleep(self.reconnect_time_wait)
                    continue
                except SourceError as exc:
                    # A restarting server may answer "JetStream unavailable" for a moment, and
                    # a stream without a leader (an election in a cluster) does not answer.
                    if not exc.retryable:
                        raise
                    recovery.failed(str(exc), last)
                    await reader.drop()
                    if reader.link is not None:
                        await self._session.drop_if_dead(reader.link)
                    if recovery.exhausted and recovery.since is not None:
                        raise self._failover.gave_up(str(exc), recovery.since) from None
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
            await reader.drop()
