"""Fast pulling from a JetStream pull consumer: our own pull requests, column-wise collection.

nats-py's ``PullSubscription.fetch()`` sends one request per batch, waits for it and builds a
metadata object per message, which caps it at a few tens of thousands of messages a second.
:class:`BulkPuller` instead publishes ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` requests
itself with the reply set to an inbox of its own, keeps several of them in flight, and reads the
stream sequence, timestamp and pending count straight out of each message's ``$JS.ACK`` reply
subject into plain lists. The inbox's frames never become nats-py ``Msg`` objects: they are read
off the wire into columns by :mod:`nilus_dagster.jetstream.inbox`. It has no knowledge of where
the consumer came from, so the benchmark can use it on any consumer.
"""

import asyncio
import json
import operator
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client

from nilus_dagster.jetstream.ack import AckColumns, ack_fields, ack_fields_each
from nilus_dagster.jetstream.admin import API_PREFIX, next_subject
from nilus_dagster.jetstream.errors import NATS_CONNECTION_GONE, PullInterrupted
from nilus_dagster.jetstream.inbox import ColumnInbox, ColumnSubscription, subscribe_columns
from nilus_dagster.messages import MessageBatch

# A pull keeps this many messages in flight (spread over several requests) unless told otherwise:
# enough that the server never waits for the next request, small enough to bound memory.
DEFAULT_IN_FLIGHT_MESSAGES = 4096
MAX_REQUESTS_IN_FLIGHT = 32


@dataclass
class _Columns:
    """What arrived since the last :meth:`BulkPuller.take`, column by column."""

    sequences: list[int] = field(default_factory=list)
    timestamps_ns: list[int] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str] | None] | None = None
    pending: int = -1


_WAKE = object()
"""Put in the subscription's queue to wake a waiting :meth:`BulkPuller.next_batch`."""

_MAX_SUBJECT_NAMES = 10_000  # decoded subjects remembered (a wildcard can match many)


class BulkPuller:
    """Pulls from one JetStream pull consumer with several pull requests in flight.

    Replies to a plain nats-py subscription on an inbox of our own are read off the wire into a
    :class:`~nilus_dagster.jetstream.inbox.ColumnInbox`; :meth:`next_batch` takes what it holds
    in one go (no await per message) into column lists, reading sequence, timestamp and
    pending count from the reply subjects. Duplicates (a
    sequence at or below one already collected) are dropped. A jump in the consumer's delivery
    sequence means a delivery went missing and ends the pull with :class:`PullInterrupted`, so
    the caller can recreate the consumer where it left off; so do a deleted consumer, a closed
    connection and missing heartbeats.

    Args:
        nc: A connected nats-py client.
        stream: Stream name.
        consumer: Name of an existing pull consumer on ``stream``.
        batch_size: Messages per pull request.
        expires: Seconds a pull request waits on the server to fill.
        in_flight: Messages to keep requested ahead of the caller (several requests); by default
            enough for the server never to wait on us.
        after_seq: Drop messages with a stream sequence at or below this.
        next_consumer_seq: The consumer sequence of the next delivery (consumer's
            ``delivered.consumer_seq + 1``), to notice lost deliveries; 0 to learn it.
        idle_heartbeat: Seconds between server heartbeats while a request waits; ``None`` picks
            one from ``expires``; 0 turns them off.
        api_prefix: JetStream API prefix.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        *,
        batch_size: int,
        expires: float,
        in_flight: int | None = None,
        after_seq: int = 0,
        next_consumer_seq: int = 0,
        idle_heartbeat: float | None = None,
        api_prefix: str = API_PREFIX,
    ):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self.batch_size = batch_size
        self.expires = expires
        wanted = in_flight if in_flight is not None else max(DEFAULT_IN_FLIGHT_MESSAGES, batch_size)
        requests = max(2, min(MAX_REQUESTS_IN_FLIGHT, -(-wanted // batch_size)))
        self.max_credit = requests * batch_size
        if idle_heartbeat is None:
            # Heartbeats let us notice a consumer that vanished (2.9 answers a pull for a missing
            # consumer with silence) without waiting for the whole expiry.
            # (The server refuses a heartbeat longer than half the expiry.)
            idle_heartbeat = min(5.0, expires * 0.45) if expires >= 1 else 0.0
        self.idle_heartbeat = idle_heartbeat
        self._next_subject = next_subject(stream, consumer, api_prefix)
        self._last_seq = after_seq
        self._next_cseq = next_consumer_seq
        self._cols = _Columns()
        self._credit = 0  # messages requested and not yet delivered or expired
        self._empty_pull = False
        self._interrupt: PullInterrupted | None = None
        self._last_activity = time.monotonic()
        self._subscription: ColumnSubscription | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._inbox_columns: ColumnInbox | None = None
        self._subject_names: dict[bytes, str] = {}
        self._inbox = ""
        self._requests: dict[int, bytes] = {}
        self.delivered = 0
        self.duplicates = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> "BulkPuller":
        """Subscribe to the reply inbox (before any request goes out)."""
        self._inbox = self.nc.new_inbox()
        # The inbox's frames are read into columns (see inbox.py) instead of becoming one Msg
        # each; the queue only carries a wake-up token per burst.
        try:
            self._subscription = await subscribe_columns(self.nc, self._inbox, _WAKE)
        except NATS_CONNECTION_GONE:
            raise PullInterrupted("the connection to NATS closed", connection_lost=True) from None
        self._queue = self._subscription.queue
        self._inbox_columns = self._subscription.inbox
        return self

    async def stop(self) -> None:
        """Unsubscribe: the server drops the requests still waiting once nobody listens."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.stop(self.nc)

    def interrupt(self, reason: str, *, connection_lost: bool = False, fatal: bool = False) -> None:
        """End the pull from outside (connection closed, permission refused...)."""
        if self._interrupt is None:
            self._interrupt = PullInterrupted(reason, connection_lost=connection_lost, fatal=fatal)
        if self._queue is not None:
            self._queue.put_nowait(_WAKE)

    @property
    def request_subject(self) -> str:
        """The subject pull requests go to."""
        return self._next_subject

    @property
    def last_seq(self) -> int:
        """Highest stream sequence collected so far."""
        return self._last_seq

    # -- receiving -----------------------------------------------------------------------------

    def _drain(self) -> None:
        """Collect everything received so far, without awaiting."""
        queue = self._queue
        assert queue is not None and self._inbox_columns is not None
        # The queue only holds wake-up tokens; the frames themselves are in the inbox.
        get = queue.get_nowait
        for _ in range(queue.qsize()):
            if get() is not _WAKE:
                # A message that went the Msg way around the inbox: its place among the
                # others is unknown, so this consumer's order can no longer be vouched for.
                self.interrupt("a message of the pull inbox bypassed its column reader")
        if len(self._inbox_columns):
            self._collect(*self._inbox_columns.take_with_acks())

    def _collect(
        self,
        subjects: list[bytes],
        replies: list[bytes],
        payloads: list[bytes],
        headers: list[dict[str, str] | None] | None,
        acks: AckColumns | None = None,
    ) -> None:
        # Column at a time (list comprehensions), not message at a time: this is the loop
        # every message goes through. A frame without a reply subject is a status message.
        if all(replies):
            self._collect_data(subjects, replies, payloads, headers, acks)
            return
        data = [i for i, reply in enumerate(replies) if reply]
        if data:
            self._collect_data(
                [subjects[i] for i in data],
                [replies[i] for i in data],
                [payloads[i] for i in data],
                None if headers is None else [headers[i] for i in data],
            )
        # Statuses after the data, so that a 408 next to messages is not an empty pull.
        for i, reply in enumerate(replies):
            if not reply:
                self._on_status(headers[i] if headers is not None else None)

    def _collect_data(
        self,
        subjects: list[bytes],
        replies: list[bytes],
        payloads: list[bytes],
        headers: list[dict[str, str] | None] | None,
        acks: AckColumns | None = None,
    ) -> None:
        count = len(replies)
        self._credit -= count
        self.delivered += count
        self._last_activity = time.monotonic()
        if acks is not None:  # read by the compiled bulk read
            sequences, cseqs, times, pendings = acks
            first_cseq, last_cseq, pending = cseqs[0], cseqs[-1], pendings[-1]
        else:
            # One consumer's replies all have the same form (see ack.stream_seq_token).
            width = replies[0].count(b".") + 1
            fields = ack_fields(replies, width)
            if fields is None:
                fields = ack_fields_each(replies)
            seq_tokens, cseq_tokens, time_tokens, pending_tokens = fields
            first_cseq = int(cseq_tokens[0])
            last_cseq = int(cseq_tokens[-1])
            pending = int(pending_tokens[-1])
            sequences = list(map(int, seq_tokens))
            times = list(map(int, time_tokens))
        # Deliveries of one consumer are numbered without holes; a hole is a lost message.
        expected = self._next_cseq or first_cseq
        if first_cseq != expected or last_cseq - expected + 1 != count:
            self.interrupt(
                f"deliveries {expected}..{expected + count - 1} of consumer {self.consumer} "
                f"arrived as {first_cseq}..{last_cseq}: some went missing"
            )
            return
        self._next_cseq = last_cseq + 1
        last = self._last_seq
        if sequences[0] <= last or not all(map(operator.lt, sequences, sequences[1:])):
            # Duplicates after a reconnect, or redeliveries (ack policies): keep only what
            # comes after everything kept so far, in order.
            keep = []
            for i, seq in enumerate(sequences):
                if seq > last:
                    keep.append(i)
                    last = seq
            self.duplicates += count - len(keep)
            if not keep:
                return
            times = [times[i] for i in keep]
            sequences = [sequences[i] for i in keep]
            subjects = [subjects[i] for i in keep]
            payloads = [payloads[i] for i in keep]
            if headers is not None:
                headers = [headers[i] for i in keep]
        cols = self._cols
        had = len(cols.sequences)
        cols.sequences += sequences
        cols.timestamps_ns += times
        cols.subjects += self._subject_column(subjects)
        cols.payloads += payloads
        if headers is not None and any(h is not None for h in headers):
            if cols.headers is None:
                cols.headers = [None] * had
            cols.headers += headers
        elif cols.headers is not None:
            cols.headers += [None] * len(sequences)
        self._last_seq = sequences[-1]
        cols.pending = pending

    def _subject_column(self, subjects: list[bytes]) -> list[str]:
        """The subjects as text: a pull of one subject (the usual case) decodes it once."""
        first = subjects[0]
        if subjects.count(first) == len(subjects):
            name = self._subject_names.get(first) or self._subject_name(first)
            return [name] * len(subjects)
        names = self._subject_names
        return [names.get(s) or self._subject_name(s) for s in subjects]

    def _subject_name(self, subject: bytes) -> str:
        name = subject.decode()
        if len(self._subject_names) < _MAX_SUBJECT_NAMES:
            self._subject_names[subject] = name
        return name

    def _on_status(self, headers: dict[str, str] | None) -> None:
        headers = headers or {}
        status = headers.get("Status", "")
        description = str(headers.get("Description", "") or "").strip()
        lowered = description.lower()
        self._last_activity = time.monotonic()
        if status == "100":  # idle heartbeat (flow control is never asked for on pulls)
            return
        if status == "408" or status == "404":
            # 408: a request expired; Nats-Pending-Messages says how much of it was never
            # filled. 404: a no-wait request found nothing. Either way the credit comes back,
            # and with nothing collected the consumer had nothing to give.
            unfilled = headers.get("Nats-Pending-Messages")
            left = int(unfilled) if unfilled is not None else self._credit
            self._credit = max(0, self._credit - left)
            if not self._cols.sequences:
                self._empty_pull = True
            return
        if status == "409":
            if "exceeded maxwaiting" in lowered:
                # Too many requests waiting on the server: this one was refused; ask less.
                self.max_credit = max(self.batch_size, self.max_credit // 2)
                self._credit = max(0, self._credit - self.batch_size)
                return
            if "maxrequestbatch" in lowered or "maxbytes" in lowered or "max_bytes" in lowered:
                self.interrupt(
                    f"consumer {self.consumer} refused a pull of {self.batch_size} messages "
                    f"({description}): lower batch_size in the address",
                    fatal=True,
                )
                return
            unfilled = headers.get("Nats-Pending-Messages")
            if unfilled is not None and "deleted" not in lowered:
                # The request ended early (leadership change, batch completed...): ask again.
                self._credit = max(0, self._credit - int(unfilled))
                return
        if status == "503":
            description = "no responders: the consumer does not exist"
        self.interrupt(f"consumer {self.consumer}: {status} {description}".strip())

    # -- requesting ----------------------------------------------------------------------------

    def _request_payload(self, batch: int) -> bytes:
        payload = self._requests.get(batch)
        if payload is None:
            body: dict[str, int] = {"batch": batch, "expires": int(self.expires * 1e9)}
            if self.idle_heartbeat:
                body["idle_heartbeat"] = int(self.idle_heartbeat * 1e9)
            payload = self._requests[batch] = json.dumps(body).encode()
        return payload

    async def _top_up(self, wanted: int | None) -> None:
        """Send requests until ``max_credit`` messages (or all the caller wants) are asked for."""
        target = self.max_credit
        if wanted is not None:
            target = min(target, wanted - len(self._cols.sequences))
        deficit = target - self._credit
        if deficit <= 0:
            return
        if self._credit <= 0:
            # Nothing was outstanding, so silence so far says nothing about the consumer.
            self._last_activity = time.monotonic()
        # Full requests only, except the tail of a bounded pull.
        while deficit >= self.batch_size or (deficit > 0 and target < self.max_credit):
            batch = min(self.batch_size, deficit)
            try:
                # A publish can wait for the socket, and the connection can close meanwhile.
                await self.nc.publish(self._next_subject, self._request_payload(batch), self._inbox)
            except NATS_CONNECTION_GONE:
                raise PullInterrupted(
                    "the connection to NATS closed", connection_lost=True
                ) from None
            self._credit += batch
            deficit -= batch

    # -- the caller's side ---------------------------------------------------------------------

    def take(self) -> MessageBatch:
        """Everything collected so far (possibly nothing), as one batch."""
        cols = self._cols
        self._empty_pull = False
        if not cols.sequences:
            return MessageBatch(num_pending=max(cols.pending, 0))
        self._cols = _Columns(pending=cols.pending)
        return MessageBatch(
            sequences=cols.sequences,
            timestamps_ns=cols.timestamps_ns,
            subjects=cols.subjects,
            payloads=cols.payloads,
            headers=cols.headers,
            num_pending=cols.pending,
        )

    async def _hand_over(self, wanted: int | None) -> MessageBatch:
        batch = self.take()
        # Ask for the next messages before handing these over, so that they arrive while the
        # caller is busy with this batch (unless the consumer said there are none).
        if batch.num_pending and not self.nc.is_closed and self._interrupt is None:
            await self._top_up(None if wanted is None else wanted - len(batch))
        return batch

    async def next_batch(
        self, wanted: int | None = None, *, max_wait: float | None = None
    ) -> MessageBatch:
        """Keep requests in flight, wait for messages and return all that have arrived.

        Returns as soon as ``batch_size`` messages (or ``wanted``) are collected or the consumer
        reports nothing more pending, with everything collected by then. Returns an empty batch
        when a pull expired without bringing anything (the consumer had nothing for
        ``expires`` seconds) or ``max_wait`` passed. A batch's ``num_pending`` is the
        consumer's pending count after its last message.

        Args:
            wanted: The most messages the caller still wants (requests never ask for more).
            max_wait: Longest wait in seconds; ``expires`` plus a margin by default.

        Raises:
            PullInterrupted: The consumer or the connection is gone, or a delivery was lost.
        """
        if wanted is not None and wanted <= 0:
            return MessageBatch()
        queue = self._queue
        if queue is None:
            raise RuntimeError("BulkPuller.start() was not called")
        wake_at = self.batch_size if wanted is None else min(self.batch_size, wanted)
        deadline = time.monotonic() + (max_wait if max_wait is not None else self.expires + 2.0)
        silence = 2 * self.idle_heartbeat + 1.0 if self.idle_heartbeat else None
        while True:
            self._drain()
            if self._interrupt is not None:
                raise self._interrupt
            cols = self._cols
            if cols.sequences and (len(cols.sequences) >= wake_at or cols.pending == 0):
                return await self._hand_over(wanted)
            if self._empty_pull:
                return await self._hand_over(wanted)
            if self.nc.is_closed:
                raise PullInterrupted("the connection to NATS closed", connection_lost=True)
            await self._top_up(wanted)
            now = time.monotonic()
            if now >= deadline:
                if self._credit > 0 and now - self._last_activity > self.expires + 1.0:
                    # Requests that expired must be answered (408); silence means the consumer
                    # or the server is gone (2.9 does not answer pulls for a missing consumer).
                    raise PullInterrupted(
                        f"no answer to pull requests on consumer {self.consumer} for "
                        f"{now - self._last_activity:.0f}s"
                    )
                return await self._hand_over(wanted)
            timeout = deadline - now
            if silence is not None and self._credit > 0:
                if now - self._last_activity > silence:
                    raise PullInterrupted(
                        f"no message or heartbeat from consumer {self.consumer} for {silence:.0f}s"
                    )
                timeout = min(timeout, silence / 2)
            try:
                await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:
                if self._cols.sequences:
                    return await self._hand_over(wanted)
