"""The bulk read of MSG frames: the compiled one against the Python one, and against bad bytes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nilus_dagster.jetstream import bulk
from nilus_dagster.jetstream.ack import reply_fields
from nilus_dagster.jetstream.inbox import ColumnInbox

OURS = 7
compiled = pytest.mark.skipif(not bulk.COMPILED, reason="_frames was not built (no C compiler)")


def msg(subject: bytes, sid: int, reply: bytes, payload: bytes) -> bytes:
    return b"MSG %s %d %s %d\r\n%s\r\n" % (subject, sid, reply, len(payload), payload)


def read(reader, data: bytes, pos: int = 0):  # type: ignore[no-untyped-def]
    inbox = ColumnInbox(lambda: None)
    done = reader(data, pos, {OURS: inbox})
    if done is None:
        return None
    end, got, frames, payload_bytes = done
    assert got is inbox
    return end, frames, payload_bytes, inbox.take()


def acks_of(data: bytes):  # type: ignore[no-untyped-def]
    inbox = ColumnInbox(lambda: None)
    assert bulk.read_bulk_compiled(data, 0, {OURS: inbox}) is not None
    return inbox.take_with_acks()[4]


tokens = st.binary(min_size=1, max_size=12).filter(lambda b: not set(b) & set(b" \t\n\x0b\x0c\r"))
payloads = st.binary(max_size=300).filter(lambda b: b"\r\n" not in b)
frames = st.lists(st.tuples(st.sampled_from([b"orders.a", b"orders.b"]), tokens, payloads))


@compiled
@settings(max_examples=300, deadline=None)
@given(frames, st.integers(min_value=0, max_value=400))
def test_both_reads_give_the_same_columns_for_plain_frames_however_the_read_ends(parts, cut):
    data = b"".join(msg(s, OURS, r, p) for s, r, p in parts)
    data = data[: max(0, len(data) - cut)]  # a read usually ends inside a frame

    assert read(bulk.read_bulk_compiled, data) == read(bulk.read_bulk_python, data)


@compiled
def test_a_payload_holding_a_crlf_is_read_by_its_size():
    data = msg(b"s", OURS, b"r1", b"a\r\nMSG x 7 y 1") + msg(b"s", OURS, b"r2", b"{}")

    end, frames, _, (subjects, replies, payloads, _) = read(bulk.read_bulk_compiled, data)

    assert (end, frames, replies) == (len(data), 2, [b"r1", b"r2"])
    assert payloads == [b"a\r\nMSG x 7 y 1", b"{}"]
    assert subjects[0] is subjects[1]  # one object for a run of the same subject
    assert read(bulk.read_bulk_python, data) is None  # it leaves such reads to the frame reader


@compiled
@pytest.mark.parametrize(
    "after",
    [b"PING\r\n", b"HMSG s 7 r 12 14\r\nNATS/1.0\r\n\r\n{}\r\n", msg(b"s", 3, b"r", b"{}")],
    ids=["ping", "hmsg", "other-sid"],
)
def test_the_compiled_read_stops_where_the_frames_stop_being_plain_ones_of_its_sid(after):
    head = msg(b"s", OURS, b"r1", b"{}") + msg(b"s", OURS, b"r2", b"[]")

    end, frames, payload_bytes, _ = read(bulk.read_bulk_compiled, head + after)

    assert (end, frames, payload_bytes) == (len(head), 2, 4)
    assert read(bulk.read_bulk_compiled, head + after, end) is None


@compiled
@pytest.mark.parametrize(
    "line",
    [
        b"MSG s 7 r 99999999999999999999\r\n",  # a size no frame has
        b"MSG s 7 r -1\r\n",
        b"MSG s 7  r 2\r\n",  # two spaces
        b"MSG s 7 r 2 \r\n",
        b"MSG s x7 r 2\r\n",
        b"MSG s 7 2\r\n",  # no reply
        b"MSG s 7 r 2\r\n{}XY",  # no CRLF after the payload
    ],
)
def test_the_compiled_read_leaves_what_it_cannot_read_to_the_frame_reader(line):
    assert read(bulk.read_bulk_compiled, line + b"{}\r\n") is None


@pytest.mark.parametrize(
    "line",
    [b"MSG s\x0b 7 r 2\r\n", b"MSG s 7\tr 2\r\n", b"MSG s\r 7 r 2\r\n", b"MSG s 7 r\x0c 2\r\n"],
    ids=["vertical-tab", "tab", "lone-cr", "form-feed"],
)
@pytest.mark.parametrize("reader", ["compiled", "python"])
def test_whitespace_other_than_single_spaces_is_left_to_the_frame_reader(line, reader):
    # nats-py separates a control line's arguments at any whitespace; only the frame reader
    # reads such a line as it does (a server passes a vertical tab on in a subject).
    if reader == "compiled" and not bulk.COMPILED:
        pytest.skip("_frames was not built (no C compiler)")
    read_bulk = bulk.read_bulk_compiled if reader == "compiled" else bulk.read_bulk_python

    assert read(read_bulk, line + b"{}\r\n") is None


@compiled
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.data())
def test_any_bytes_give_none_or_frames_that_are_all_in_the_read(noise, data):
    valid = msg(b"s", OURS, b"r", b'{"a":1}') * 2
    where = data.draw(st.integers(min_value=0, max_value=len(valid)))
    raw = valid[:where] + noise + valid[where:]
    pos = data.draw(st.integers(min_value=0, max_value=len(raw)))

    done = read(bulk.read_bulk_compiled, raw, pos)

    if done is not None:
        end, frames, payload_bytes, (subjects, replies, payloads, _) = done
        assert pos < end <= len(raw)
        assert len(subjects) == len(replies) == len(payloads) == frames >= 1
        assert sum(map(len, payloads)) == payload_bytes


@compiled
def test_a_position_outside_the_read_is_an_error():
    with pytest.raises(ValueError):
        bulk.read_bulk_compiled(b"MSG s 7 r 0\r\n\r\n", 99, {})


ack_number = st.integers(min_value=0, max_value=2**63 - 1)
ack_reply = st.builds(
    lambda form, n: (
        b"$JS.ACK.S.c.1.%d.%d.%d.%d" % n
        if form == 9
        else b"$JS.ACK.dom.HASH.S.c.1.%d.%d.%d.%d" % n + (b".tok" if form == 12 else b"")
    ),
    st.sampled_from([9, 11, 12]),
    st.tuples(ack_number, ack_number, ack_number, ack_number),
)


@compiled
@settings(max_examples=200, deadline=None)
@given(st.lists(ack_reply, min_size=1, max_size=20))
def test_the_compiled_read_reads_ack_replies_of_every_form_as_python_does(replies):
    data = b"".join(msg(b"s", OURS, r, b"{}") for r in replies)

    acks = acks_of(data)

    assert acks == tuple(map(list, zip(*map(reply_fields, replies), strict=True)))


@compiled
@pytest.mark.parametrize(
    "odd",
    [
        b"_INBOX.reply",  # not an ack subject
        b"$JS.ACK.S.c.1.5.6.7",  # 8 tokens
        b"$JS.ACK.dom.HASH.S.c.1.5.6.7.8.9.x.y",  # 13 tokens
        b"$JS.ACK.S.c.1.5.x6.7.8",  # a field that is not a number
        b"$JS.ACK.S.c.1.5.6.%d.8" % 2**63,  # over a 64-bit integer
        b"$JS.NAK.S.c.1.5.6.7.8",
    ],
)
def test_one_reply_that_is_not_an_ack_subject_leaves_the_replies_to_the_puller(odd):
    data = msg(b"s", OURS, b"$JS.ACK.S.c.1.5.6.7.8", b"{}") + msg(b"s", OURS, odd, b"{}")

    assert acks_of(data) is None
