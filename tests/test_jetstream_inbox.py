"""The column inbox's protocol parser against nats-py's own, frame for frame."""

import asyncio
import itertools
import random
import time
from typing import Any

import pytest
from nats.aio.client import Client
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

import nilus_dagster.jetstream.inbox as inbox_module
from nilus_dagster.jetstream import bulk
from nilus_dagster.jetstream.ack import reply_fields
from nilus_dagster.jetstream.inbox import ColumnInbox, FastParser, install, uninstall

OURS, OTHER = 7, 3


@pytest.fixture(autouse=True, params=["compiled", "python"])
def bulk_read(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each bulk read: the C one and the Python one."""
    if request.param == "compiled":
        if not bulk.COMPILED:
            pytest.skip("nilus_dagster.jetstream._frames was not built (no C compiler)")
        monkeypatch.setattr(inbox_module, "_bulk_frames", bulk.read_bulk_compiled)
    else:
        monkeypatch.setattr(inbox_module, "_bulk_frames", bulk.read_bulk_python)
    return request.param


class FakeClient(Client):
    """An unconnected nats-py client that records what its parser hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid, subject, reply, data, headers) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), headers))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, text: str) -> None:
        self.calls.append(("err", text))


def frame(sid: int, payload: bytes, reply: bytes = b"", headers: bytes = b"") -> bytes:
    subject = b"_INBOX.abc" if sid == OURS else b"other.subject"
    reply_part = b" " + reply if reply else b""
    if headers:
        size = len(headers) + len(payload)
        line = b"HMSG %s %d%s %d %d\r\n" % (subject, sid, reply_part, len(headers), size)
        return line + headers + payload + b"\r\n"
    return b"MSG %s %d%s %d\r\n" % (subject, sid, reply_part, len(payload)) + payload + b"\r\n"


STATUS_408 = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\n\r\n"
USER_HEADERS = b"NATS/1.0\r\nX-Trace: t-1\r\n\r\n"


def wire(count: int = 200, *, special: bool = True, crlf: tuple[int, ...] = (29, 150)) -> bytes:
    parts = [b'INFO {"server_id":"x"}\r\n', b"+OK\r\n"] if special else []
    for i in range(count):
        reply = b"$JS.ACK.S.C.1.%d.%d.170000000%d.%d" % (i, i, i, count - i)
        payload = b'{"i":%d,"text":"%s"}' % (i, b"x" * (i % 50))
        if i in crlf:
            # A CRLF (and what looks like a frame) inside a payload.
            payload = b'{"i":%d,"text":"a\r\nMSG fake 7 $JS.ACK 9\r\n"}' % i
        parts.append(frame(OURS, payload, reply))
        if not special:
            continue
        if i % 37 == 0:
            parts.append(frame(OTHER, b"for someone else %d" % i, b"_INBOX.r"))
        if i % 53 == 0:
            parts.append(b"PING\r\n")
        if i == 13:
            parts.append(frame(OURS, b"", headers=STATUS_408))
        if i == 17:
            parts.append(frame(OURS, b"with headers", b"$JS.ACK.S.C.1.99.99.1.0", USER_HEADERS))
        if i == 23:
            parts.append(frame(OTHER, b"other with headers", headers=USER_HEADERS))
    if special:
        parts += [b"PONG\r\n", frame(OURS, b"", b"$JS.ACK.S.C.1.50.50.1.0")]
    return b"".join(parts)


async def reference(data: bytes, chunks: list[bytes]) -> FakeClient:
    """nats-py's parser: everything goes to the client."""
    client = FakeClient()
    parser = Parser(client)
    for chunk in chunks:
        await parser.parse(chunk)
    return client


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def as_calls(client: FakeClient, inbox: ColumnInbox | None) -> tuple[list[Any], list[Any]]:
    mine = []
    others = []
    for call in client.calls:
        if call[0] == "msg" and call[1] == OURS:
            mine.append((call[3], call[4], call[5]))
        else:
            others.append(call)
    return mine, others


@pytest.mark.parametrize("seed", range(30))
def test_same_frames_as_nats_py_however_the_bytes_are_cut(seed: int) -> None:
    data = wire()
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(data)), rng.randint(1, 40)) if seed else []
    chunks = split(data, cuts)

    async def go() -> None:
        ref = await reference(data, chunks)
        ref_mine, ref_others = as_calls(ref, None)
        client = FakeClient()
        client._ps = Parser(client)
        wakes: list[int] = []
        inbox = ColumnInbox(lambda: wakes.append(1))
        install(client, OURS, inbox)
        assert isinstance(client._ps, FastParser)
        for chunk in chunks:
            await client._ps.parse(chunk)
        _, others = as_calls(client, inbox)
        assert others == ref_others  # other subscriptions and operations: untouched
        subjects, replies, payloads, headers = inbox.take()
        assert all(s == b"_INBOX.abc" for s in subjects)
        # nats-py hands headers to the client raw; the inbox holds them parsed.
        parsed = [await client._process_headers(h) for _, _, h in ref_mine]
        assert list(zip(replies, payloads, strict=True)) == [(r, p) for r, p, _ in ref_mine]
        assert headers == parsed
        assert headers[replies.index(b"")] == {
            "Status": "408",
            "Description": "Request Timeout",
            "Nats-Pending-Messages": "5",
        }
        traced = headers[replies.index(b"$JS.ACK.S.C.1.99.99.1.0")]
        assert traced is not None and traced["X-Trace"] == "t-1"
        assert 1 <= len(wakes) <= len(chunks)
        assert client.stats["in_msgs"] == len(replies)

    asyncio.run(go())


def test_switched_while_nats_py_waits_for_a_payload() -> None:
    async def go() -> None:
        client = FakeClient()
        client._ps = Parser(client)
        other = frame(OTHER, b"0123456789", b"r")
        await client._ps.parse(other[:-5])
        inbox = ColumnInbox(lambda: None)
        install(client, OURS, inbox)
        mine = frame(OURS, b"x", b"$JS.ACK.S.C.1.1.1.1.0")
        await client._ps.parse(other[-5:] + mine)
        assert client.calls == [("msg", OTHER, b"other.subject", b"r", b"0123456789", None)]
        assert inbox.take()[1:3] == ([b"$JS.ACK.S.C.1.1.1.1.0"], [b"x"])
        uninstall(client, OURS)
        await client._ps.parse(mine)
        assert client.calls[-1][1] == OURS  # back to nats-py's way
        assert not len(inbox)

    asyncio.run(go())


def test_garbage_is_a_protocol_error_like_nats_py() -> None:
    async def go() -> None:
        client = FakeClient()
        client._ps = Parser(client)
        install(client, OURS, ColumnInbox(lambda: None))
        with pytest.raises(ProtocolError):
            await client._ps.parse(b"WHAT is this\r\n")
        client._ps.reset()
        with pytest.raises(ProtocolError):
            await client._ps.parse(b"MSG a 7 b c d e\r\n")

    asyncio.run(go())


def test_install_refuses_a_client_without_nats_py_parser() -> None:
    client = FakeClient()
    client._ps = object()  # type: ignore[assignment]
    with pytest.raises(RuntimeError):
        install(client, OURS, ColumnInbox(lambda: None))


@pytest.mark.parametrize("seed", range(10))
def test_runs_of_plain_frames_are_read_in_bulk_with_the_same_result(
    seed: int, monkeypatch: pytest.MonkeyPatch, bulk_read: str
) -> None:
    bulk_reads: list[int] = []
    original = inbox_module._bulk_frames

    def counting(*args: Any) -> Any:
        done = original(*args)
        if done is not None:
            bulk_reads.append(done[2])
        return done

    monkeypatch.setattr(inbox_module, "_bulk_frames", counting)
    data = wire(500, special=False, crlf=(450,))
    rng = random.Random(seed)
    chunks = split(data, rng.sample(range(1, len(data)), rng.randint(3, 12)))

    async def go() -> None:
        ref_mine, _ = as_calls(await reference(data, chunks), None)
        client = FakeClient()
        inbox = ColumnInbox(lambda: None)
        install(client, OURS, inbox)
        for chunk in chunks:
            await client._ps.parse(chunk)
        assert client.calls == []
        subjects, replies, payloads, headers, acks = inbox.take_with_acks()
        assert list(zip(replies, payloads, strict=True)) == [(r, p) for r, p, _ in ref_mine]
        assert len(replies) == 500 and headers is None
        assert set(subjects) == {b"_INBOX.abc"}
        if bulk_read == "compiled":
            # The replies were read on the way, the frames cut by the reads' ends included.
            read_one_by_one = tuple(map(list, zip(*map(reply_fields, replies), strict=True)))
            assert acks == read_one_by_one
            assert acks[0] == list(range(500)) and acks[3] == list(range(500, 0, -1))
        else:
            assert acks is None  # the puller reads the replies

    asyncio.run(go())
    assert bulk_reads  # (a chunk holding a CRLF payload or a cut frame is read frame by frame)


@pytest.mark.parametrize("seed", range(10))
def test_a_subject_followed_by_other_whitespace_reads_as_nats_py_reads_it(seed: int) -> None:
    # A server passes a vertical tab that a publisher put in a subject on; nats-py's pattern
    # takes it for a separator, wherever the reads happen to be cut.
    frames = [
        b"MSG _INBOX.abc\x0b %d $JS.ACK.S.C.1.%d.%d.1.0 2\r\n{}\r\n" % (OURS, i, i)
        if i % 3 == 0
        else frame(OURS, b"[]", b"$JS.ACK.S.C.1.%d.%d.1.0" % (i, i))
        for i in range(60)
    ]
    data = b"".join(frames)
    rng = random.Random(seed)
    chunks = split(data, rng.sample(range(1, len(data)), rng.randint(0, 12)))

    async def go() -> None:
        ref = await reference(data, chunks)
        expected = [(c[2], c[3], c[4]) for c in ref.calls if c[0] == "msg"]
        client, inbox = _installed()
        for chunk in chunks:
            await client._ps.parse(chunk)
        subjects, replies, payloads, _ = inbox.take()
        assert list(zip(subjects, replies, payloads, strict=True)) == expected
        assert {s for s, _, _ in expected} == {b"_INBOX.abc"}

    asyncio.run(go())


def _installed() -> tuple[FakeClient, ColumnInbox]:
    client = FakeClient()
    client._ps = Parser(client)
    inbox = ColumnInbox(lambda: None)
    install(client, OURS, inbox)
    return client, inbox


def test_a_large_payload_in_many_reads_is_read_once_it_is_all_there() -> None:
    """Each read of a 16 MB payload in 32 KB pieces once copied and re-read everything
    buffered so far: 8 MB took 1.2 s against nats-py's 0.014 s, with the event loop blocked.
    Now a partial payload is only appended to, whichever subscription it belongs to."""
    big = bytes(range(256)) * (16 * 4096)  # 16 MB, with CRLFs and "MSG" inside
    data = frame(OURS, big, b"$JS.ACK.S.C.1.1.1.1.0") + frame(OTHER, big[:1000], b"r")
    data += frame(OTHER, big, b"r")

    async def go() -> tuple[ColumnInbox, FakeClient, float]:
        client, inbox = _installed()
        started = time.perf_counter()
        for at in range(0, len(data), 32 * 1024):
            await client._ps.parse(data[at : at + 32 * 1024])
        return inbox, client, time.perf_counter() - started

    inbox, client, seconds = asyncio.run(go())
    assert inbox.take()[1:3] == ([b"$JS.ACK.S.C.1.1.1.1.0"], [big])
    assert [call[4] for call in client.calls] == [big[:1000], big]
    assert client.stats["in_bytes"] == len(big)  # nats-py counts the others' bytes itself
    assert seconds < 1.5, seconds  # linear: about 0.05 s here; quadratic was over 4 s


def test_a_control_line_split_across_reads_waits_like_nats_py() -> None:
    """An async INFO of a big cluster (connect_urls) can be longer than 4 KB and arrive in
    two reads; it is not a protocol error (that would force a reconnect each time)."""
    urls = ",".join(f'"10.0.{i // 250}.{i % 250}:4222"' for i in range(400))
    info = b'INFO {"server_id":"x","connect_urls":[%s]}\r\n' % urls.encode()
    assert len(info) > 4096 * 1.5

    async def go() -> FakeClient:
        client, _ = _installed()
        for at in range(0, len(info), 3000):
            await client._ps.parse(info[at : at + 3000])
        return client

    calls = asyncio.run(go()).calls
    assert len(calls) == 1 and calls[0][0] == "info"
    assert len(calls[0][1]["connect_urls"]) == 400


def test_a_reset_mid_frame_drops_the_dead_connections_bytes() -> None:
    """On a reconnect nats-py resets the parser: half a frame of the old connection must not
    be glued to the new connection's bytes."""

    async def go() -> ColumnInbox:
        client, inbox = _installed()
        old = frame(OURS, b"x" * 100, b"$JS.ACK.S.C.1.1.1.1.0")
        await client._ps.parse(old[:60])
        client._ps.reset()
        await client._ps.parse(frame(OURS, b"new", b"$JS.ACK.S.C.1.2.2.1.0"))
        return inbox

    assert asyncio.run(go()).take()[1:3] == ([b"$JS.ACK.S.C.1.2.2.1.0"], [b"new"])


def test_byte_counts_match_nats_py() -> None:
    data = wire()

    async def go() -> tuple[int, int]:
        ref_client = FakeClient()
        ref = Parser(ref_client)
        await ref.parse(data)
        ref_bytes = sum(len(call[4]) for call in ref_client.calls if call[0] == "msg")
        client, _ = _installed()
        await client._ps.parse(data)
        others = sum(len(call[4]) for call in client.calls if call[0] == "msg")
        return ref_bytes, client.stats["in_bytes"] + others

    ref_bytes, ours = asyncio.run(go())
    assert ours == ref_bytes
