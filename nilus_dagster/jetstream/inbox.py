"""A lean read path for pulled messages: MSG/HMSG frames of our inboxes straight into columns.

nats-py turns every incoming message into a ``Msg`` object: a regular-expression match of the
control line, a copy of the payload out of a ``bytearray``, one coroutine call, two ``decode()``
calls and a queue put per message. A profile of a 200k-message drain put about half of the
pull's time there. :class:`ColumnInbox` takes the frames of the subscriptions registered with
it (the bulk puller's reply inbox) off the wire before that: the client's protocol parser is
switched to :class:`FastParser`, which reads the frames of a registered subscription into plain
lists (subject, reply, payload; headers only when a frame has them) and handles every other
frame and protocol operation exactly as nats-py's own parser does. So requests, other
subscriptions, PING/PONG, INFO, -ERR and reconnects are untouched: the transport (TCP, TLS,
WebSocket) and authentication sit below the parser and do not change either.

This reaches into nats-py's private parser API (``Client._ps``, ``Parser.buf/state/needed``,
``Client._process_*``, ``Subscription._id/_pending_queue``). What it relies on is checked when
this module is imported (:data:`FAST_PATH_PROBLEM`); where a nats-py release no longer has it,
:func:`subscribe_columns` takes the public path instead (a subscription callback that fills the
same columns from ``Msg`` objects: slower, never wrong) and says so once in a warning. A nats-py
release can make ingestion slower, never break it. ``NILUS_NATS_PUBLIC_PARSER=1`` chooses the
public path on purpose.
"""

import asyncio
import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError

from nilus_dagster.jetstream.ack import AckColumns, reply_fields
from nilus_dagster.jetstream.bulk import read_bulk as _bulk_frames

try:
    from nats.protocol import parser as nats_parser
except ImportError:  # a nats-py without that module: the public path only
    nats_parser = None  # type: ignore[assignment]


PUBLIC_PARSER_ENV = "NILUS_NATS_PUBLIC_PARSER"
logger = logging.getLogger("nilus_dagster.jetstream")

_MODULE_NAMES = (
    "Parser",
    "AWAITING_CONTROL_LINE",
    "AWAITING_MSG_PAYLOAD",
    "OK_RE",
    "ERR_RE",
    "PING_RE",
    "PONG_RE",
    "INFO_RE",
)
_PARSER_STATE = ("buf", "state", "needed", "header_needed", "msg_arg", "nc")
_CLIENT_HANDLERS = (
    "_process_msg",
    "_process_headers",
    "_process_err",
    "_process_ping",
    "_process_pong",
    "_process_info",
)


def fast_path_problem() -> str | None:
    """What this nats-py lacks for the fast path, or ``None`` when it has all of it."""
    if os.environ.get(PUBLIC_PARSER_ENV, "").strip().lower() in ("1", "true", "yes"):
        return f"{PUBLIC_PARSER_ENV} is set"
    if nats_parser is None:
        return "nats.protocol.parser is missing"
    missing = [f"nats.protocol.parser.{n}" for n in _MODULE_NAMES if not hasattr(nats_parser, n)]
    if not missing:
        try:
            probe = nats_parser.Parser()
        except Exception as exc:  # a changed constructor
            return f"nats.protocol.parser.Parser() fails ({type(exc).__name__})"
        missing += [f"Parser.{a}" for a in _PARSER_STATE if not hasattr(probe, a)]
        if not isinstance(getattr(probe, "msg_arg", None), dict):
            missing.append("Parser.msg_arg (a dict)")
        if not asyncio.iscoroutinefunction(getattr(nats_parser.Parser, "parse", None)):
            missing.append("async Parser.parse")
    missing += [f"Client.{h}" for h in _CLIENT_HANDLERS if not callable(getattr(Client, h, None))]
    return f"this nats-py lacks {', '.join(missing)}" if missing else None


FAST_PATH_PROBLEM = fast_path_problem()
"""Why the fast path is off (checked at import), or ``None``."""

_ParserBase: Any = nats_parser.Parser if FAST_PATH_PROBLEM is None else object
_CONTROL = getattr(nats_parser, "AWAITING_CONTROL_LINE", None)
_PAYLOAD = getattr(nats_parser, "AWAITING_MSG_PAYLOAD", None)


def _unanchored(pattern: "re.Pattern[bytes] | None") -> "re.Pattern[bytes]":
    # nats-py's control-line patterns start with \A, which only matches at the very start of
    # the buffer; without it, match(data, pos) anchors at pos instead.
    if pattern is None:
        return re.compile(b"(?!)")  # the fast path is off; never used
    return re.compile(pattern.pattern.removeprefix(b"\\A"))


_OK_RE = _unanchored(getattr(nats_parser, "OK_RE", None))
_ERR_RE = _unanchored(getattr(nats_parser, "ERR_RE", None))
_PING_RE = _unanchored(getattr(nats_parser, "PING_RE", None))
_PONG_RE = _unanchored(getattr(nats_parser, "PONG_RE", None))
_INFO_RE = _unanchored(getattr(nats_parser, "INFO_RE", None))


class ColumnInbox:
    """The frames of one subscription, in arrival order, column by column.

    Filled by :class:`FastParser` on the event loop; emptied with :meth:`take`. A status
    message (no reply subject) sits among the data in the order it arrived; ``headers`` holds
    the parsed headers of the frames that had any (``None`` when none had); ``acks`` what the
    reply subjects say, as read by the compiled bulk read (``None`` once a frame came any other
    way: then the replies are read by whoever takes them).

    Args:
        wake: Called (without arguments) when the inbox goes from empty to non-empty, so a
            waiting reader can be woken once per burst rather than once per message.
    """

    __slots__ = ("acks", "headers", "payloads", "replies", "subjects", "wake", "woken")

    def __init__(self, wake: Any):
        self.wake = wake
        self.woken = False
        self.subjects: list[bytes] = []
        self.replies: list[bytes] = []
        self.payloads: list[bytes] = []
        self.headers: list[dict[str, str] | None] | None = None
        self.acks: AckColumns | None = ([], [], [], [])

    def __len__(self) -> int:
        return len(self.replies)

    def take(
        self,
    ) -> tuple[list[bytes], list[bytes], list[bytes], list[dict[str, str] | None] | None]:
        """Everything received since the last call: ``(subjects, replies, payloads, headers)``."""
        return self.take_with_acks()[:4]  # type: ignore[return-value]

    def take_with_acks(
        self,
    ) -> tuple[
        list[bytes], list[bytes], list[bytes], list[dict[str, str] | None] | None, AckColumns | None
    ]:
        """:meth:`take`, and what the replies say when every frame came with it read."""
        taken = (self.subjects, self.replies, self.payloads, self.headers, self.acks)
        self.subjects, self.replies, self.payloads, self.headers = [], [], [], None
        self.acks = ([], [], [], [])
        self.woken = False
        return taken

    def add_run(
        self,
        subjects: list[bytes],
        replies: list[bytes],
        payloads: list[bytes],
        acks: AckColumns | None,
    ) -> None:
        """Add a run of frames without headers read at once (``acks``: see :meth:`add_acks`)."""
        self.subjects += subjects
        self.replies += replies
        self.payloads += payloads
        self.add_acks(acks)
        if self.headers is not None:
            self.headers += [None] * len(replies)

    def add_acks(self, acks: AckColumns | None) -> None:
        """Record what the replies of frames just added say (``None``: it was not read)."""
        for column, values in self._ack_pairs(acks):
            column += values

    def add_ack(self, fields: tuple[int, int, int, int] | None) -> None:
        """Record what the reply of one frame just added says (``None``: it says nothing)."""
        for column, value in self._ack_pairs(fields):
            column.append(value)

    def _ack_pairs(self, given: Sequence[Any] | None) -> Iterable[tuple[list[int], Any]]:
        """Each ack column with ``given``'s; none from the first frame whose reply is unknown."""
        if given is None:
            self.acks = None
        return () if self.acks is None else zip(self.acks, given, strict=True)

    def add_message(self, msg: Any) -> None:
        """Add one nats-py ``Msg`` (the public path: a subscription callback)."""
        self.acks = None
        headers = dict(msg.headers) if msg.headers else None
        if headers is not None or self.headers is not None:
            self.add_headers(len(self.replies), headers)
        self.subjects.append(msg.subject.encode())
        self.replies.append((msg.reply or "").encode())
        self.payloads.append(msg.data)
        if not self.woken:
            self.woken = True
            self.wake()

    def add_headers(self, index: int, headers: dict[str, str] | None) -> None:
        """Record the headers of frame ``index`` (the column is made on the first ones)."""
        if self.headers is None:
            if headers is None:
                return
            self.headers = [None] * index
        self.headers.append(headers)


class FastParser(_ParserBase):
    """nats-py's protocol parser, with the frames of registered subscriptions kept as columns.

    Installed on a live client by :func:`install` (the parser's state carries over, so it can
    be switched mid-stream). Frames of other subscriptions and all other operations go to the
    client exactly as nats-py's parser would send them.
    """

    inboxes: dict[int, ColumnInbox]

    async def parse(self, data: bytes = b"") -> None:
        """Parse ``data`` like nats-py does, reading registered inboxes' frames into columns."""
        inboxes = self.__dict__.get("inboxes")
        if not inboxes:
            await _ParserBase.parse(self, data)
            return
        if self.buf:
            self.buf.extend(data)
            if self.state == _PAYLOAD and len(self.buf) < self.needed + 2:
                # A large payload arrives over many reads: wait for all of it instead of
                # copying and reading what is here on every read (quadratic in its size).
                return
            data = bytes(self.buf)
        # Frames are read from an immutable ``data`` by position (slices of bytes are the only
        # copies); what is left of it goes back into a fresh buffer at the end. reset() (on a
        # reconnect, possibly from inside an await below) replaces the buffer: then the rest
        # of ``data`` belongs to the dead connection and is dropped, as nats-py does.
        own = self.buf = bytearray()
        pos = 0
        size = len(data)
        nc = self.nc
        touched: list[ColumnInbox] = []
        received = received_bytes = 0
        bulk = True  # one failed bulk read per call: its frames are read one by one after
        try:
            while pos < size:
                if bulk and self.state == _CONTROL:
                    done = _bulk_frames(data, pos, inboxes)
                    if done is None:
                        bulk = False
                    else:
                        pos, inbox, frames, payload_bytes = done
                        received += frames
                        received_bytes += payload_bytes
                        if not inbox.woken:
                            inbox.woken = True
                            touched.append(inbox)
                        continue
                if self.state == _PAYLOAD:
                    # The frame whose control line was read last (here, or by nats-py's
                    # parser before the switch), once all of its payload is here.
                    start, end = pos, pos + self.needed
                    if end + 2 > size:
                        break
                    pos = end + 2
                    arg = self.msg_arg
                    sid, subject, reply = arg["sid"], arg["subject"], arg["reply"]
                    header_size, self.header_needed = self.header_needed, 0
                    self.state = _CONTROL
                    inbox = inboxes.get(sid)
                    if inbox is None:
                        headers = data[start : start + header_size] if header_size else None
                        payload = data[start + header_size : end]
                        await nc._process_msg(sid, subject, reply, payload, headers)  # noqa: SLF001 - nats-py parser API, checked by install()
                        if self.buf is not own:
                            return
                        continue
                    received += 1
                    received_bytes += end - start - header_size
                    if header_size:
                        # Rare on a pull inbox (status messages, messages published with
                        # headers): parsed by nats-py, so they read as they always did.
                        parsed = await nc._process_headers(data[start : start + header_size])  # noqa: SLF001 - nats-py parser API, checked by install()
                        if self.buf is not own:
                            return
                        inbox.add_headers(len(inbox.replies), parsed)
                    elif inbox.headers is not None:
                        inbox.headers.append(None)
                    if inbox.acks is not None:
                        # A frame that ended a read or starts one: its reply alone is read
                        # here, so that the frames read in bulk around it keep theirs.
                        inbox.add_ack(reply_fields(reply))
                    inbox.subjects.append(subject)
                    inbox.replies.append(reply)
                    inbox.payloads.append(data[start + header_size : end])
                    if not inbox.woken:
                        inbox.woken = True
                        touched.append(inbox)
                    continue
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break  # a line split across reads (nats-py waits for the rest too)
                hmsg = data.startswith(b"HMSG", pos)
                if hmsg or data.startswith(b"MSG", pos):
                    self._read_msg_line(data[pos + (4 if hmsg else 3) : eol].split(), hmsg)
                    pos = eol + 2
                    continue
                # Everything else is one line, handled as nats-py's parser handles it.
                pos = await self._operation(data, pos, eol)
                if self.buf is not own:
                    return
        finally:
            if pos < size and self.buf is own:
                own.extend(data[pos:])
            if received:
                nc.stats["in_msgs"] += received
                nc.stats["in_bytes"] += received_bytes
            for inbox in touched:
                inbox.wake()

    def _read_msg_line(self, args: list[bytes], hmsg: bool) -> None:
        """Take a MSG/HMSG control line's arguments; the payload is read next."""
        count = len(args)
        try:
            if hmsg:
                if count == 5:
                    subject, sid_text, reply, header_text, size_text = args
                elif count == 4:
                    subject, sid_text, header_text, size_text = args
                    reply = b""
                else:
                    raise ValueError(count)
                header_size = int(header_text)
            else:
                if count == 4:
                    subject, sid_text, reply, size_text = args
                elif count == 3:
                    subject, sid_text, size_text = args
                    reply = b""
                else:
                    raise ValueError(count)
                header_size = 0
            sid = int(sid_text)
            needed = int(size_text)
        except ValueError:
            raise ProtocolError("nats: malformed MSG") from None
        self.msg_arg["subject"] = subject
        self.msg_arg["sid"] = sid
        self.msg_arg["reply"] = reply
        self.needed = needed
        self.header_needed = header_size
        self.state = _PAYLOAD

    async def _operation(self, data: bytes, pos: int, eol: int) -> int:
        """Handle the one-line operation at ``pos``; returns where the next one starts."""
        nc = self.nc
        if _OK_RE.match(data, pos):
            return eol + 2
        err = _ERR_RE.match(data, pos)
        if err:
            await nc._process_err((err.group(1) or b"").decode().lower())  # noqa: SLF001 - nats-py parser API, checked by install()
            return err.end()
        if _PING_RE.match(data, pos):
            await nc._process_ping()  # noqa: SLF001 - nats-py parser API, checked by install()
            return eol + 2
        if _PONG_RE.match(data, pos):
            await nc._process_pong()  # noqa: SLF001 - nats-py parser API, checked by install()
            return eol + 2
        info = _INFO_RE.match(data, pos)
        if info:
            await nc._process_info(json.loads(info.group(1).decode()))  # noqa: SLF001 - nats-py parser API, checked by install()
            return info.end()
        raise ProtocolError("nats: unknown protocol")


def _parser_of(nc: Client) -> object:
    """nats-py's protocol parser of ``nc`` (private: :func:`install` checks what it is)."""
    return nc._ps if hasattr(nc, "_ps") else None  # noqa: SLF001 - nats-py's parser, checked


def install(nc: Client, sid: int, inbox: ColumnInbox) -> None:
    """Route the frames of subscription ``sid`` on ``nc`` into ``inbox``.

    Raises:
        RuntimeError: This nats-py's parser is not the one this was written against.
    """
    parser = _parser_of(nc)
    needed = ("buf", "state", "needed", "header_needed", "msg_arg", "nc")
    handlers = ("_process_msg", "_process_headers", "_process_err", "_process_ping")
    handlers += ("_process_pong", "_process_info")
    if (
        FAST_PATH_PROBLEM is not None
        or not isinstance(parser, _ParserBase)
        or not all(hasattr(parser, a) for a in needed)
        or not all(callable(getattr(nc, h, None)) for h in handlers)
    ):
        raise RuntimeError("this nats-py version's protocol parser is not supported; use 2.16")
    if not isinstance(parser, FastParser):
        # The same object, so the read loop's next parse() call picks it up with its buffer
        # and state as they are (a frame half-read by nats-py's parser is finished here).
        parser.__class__ = FastParser
    inboxes = parser.__dict__.setdefault("inboxes", {})
    inboxes[sid] = inbox


def uninstall(nc: Client, sid: int) -> None:
    """Stop routing subscription ``sid``; its later frames go through nats-py as usual."""
    parser = _parser_of(nc)
    inboxes = getattr(parser, "__dict__", {}).get("inboxes")
    if inboxes:
        inboxes.pop(sid, None)


@dataclass
class ColumnSubscription:
    """A subscription whose messages land in :attr:`inbox`.

    A wake-up token is put on :attr:`queue` once per burst.

    On the fast path :attr:`queue` is the subscription's own message queue, so a ``Msg`` found
    there went around the column reader; on the public path it only ever holds tokens.
    """

    subscription: Subscription
    inbox: ColumnInbox
    queue: "asyncio.Queue[Any]"
    fast_sid: int | None

    async def stop(self, nc: Client) -> None:
        """Stop routing and unsubscribe (the connection may be going away: nothing to undo)."""
        if self.fast_sid is not None:
            uninstall(nc, self.fast_sid)
        if not nc.is_closed:
            try:
                await self.subscription.unsubscribe()
            except Exception as exc:
                logger.debug("unsubscribe of the pull inbox failed: %s", type(exc).__name__)


_warned: list[str] = []


def _warn_public_path(reason: str) -> None:
    if not _warned:
        _warned.append(reason)
        logger.warning(
            "nats-py's protocol parser is not the one the fast pull path was written for (%s): "
            "pulling through nats-py's public API instead, which is slower but loses nothing",
            reason,
        )


async def subscribe_columns(nc: Client, subject: str, wake_token: object) -> ColumnSubscription:
    """Subscribe to ``subject`` with its messages read into a :class:`ColumnInbox`.

    The fast path when this nats-py has what it needs, else the public one (see the module).
    No pending limits: the caller's pull credit bounds what can pile up.
    """
    if FAST_PATH_PROBLEM is None:
        sub = await nc.subscribe(subject, pending_msgs_limit=0, pending_bytes_limit=0)
        queue = sub._pending_queue if hasattr(sub, "_pending_queue") else None  # noqa: SLF001 - nats-py private, type-checked below
        sid = sub._id if hasattr(sub, "_id") else None  # noqa: SLF001 - see above
        if isinstance(queue, asyncio.Queue) and isinstance(sid, int):
            inbox = ColumnInbox(functools.partial(queue.put_nowait, wake_token))
            try:
                install(nc, sid, inbox)
            except RuntimeError as exc:
                reason = str(exc)
            else:
                return ColumnSubscription(sub, inbox, queue, sid)
        else:
            reason = "its Subscription has no _pending_queue/_id"
        await sub.unsubscribe()
    else:
        reason = FAST_PATH_PROBLEM
    _warn_public_path(reason)
    tokens: asyncio.Queue[Any] = asyncio.Queue()
    inbox = ColumnInbox(functools.partial(tokens.put_nowait, wake_token))

    async def on_message(msg: Any) -> None:
        inbox.add_message(msg)

    sub = await nc.subscribe(subject, cb=on_message, pending_msgs_limit=0, pending_bytes_limit=0)
    return ColumnSubscription(sub, inbox, tokens, None)
