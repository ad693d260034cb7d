"""What a JetStream ``$JS.ACK`` reply subject says about a delivered message.

The server puts a delivered message's stream sequence, consumer sequence, timestamp and pending
count into its reply subject; the puller reads them from there instead of from a per-message
metadata object, for a whole batch of replies at once.
"""

from dataclasses import dataclass

AckColumns = tuple[list[int], list[int], list[int], list[int]]
"""Stream sequences, consumer sequences, timestamps (ns) and pending counts, one per reply."""


@dataclass(frozen=True)
class AckMetadata:
    """What a ``$JS.ACK`` reply subject says about one delivered message."""

    stream: str
    consumer: str
    delivered: int
    stream_seq: int
    consumer_seq: int
    timestamp_ns: int
    pending: int
    domain: str | None = None


def parse_ack_reply(reply: str) -> AckMetadata:
    """Parse a ``$JS.ACK`` reply subject, v1 or v2 (with domain and account hash).

    v1: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>``;
    v2: ``$JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>``
    optionally followed by a random token.

    Raises:
        ValueError: ``reply`` is not a JetStream ack subject.
    """
    tokens = reply.split(".")
    n = len(tokens)
    if n < 9 or tokens[0] != "$JS" or tokens[1] != "ACK" or n == 10 or n > 12:
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    at = stream_seq_token(n)
    return AckMetadata(
        domain=None if n == 9 or tokens[2] == "_" else tokens[2],
        stream=tokens[at - 3],
        consumer=tokens[at - 2],
        delivered=int(tokens[at - 1]),
        stream_seq=int(tokens[at]),
        consumer_seq=int(tokens[at + 1]),
        timestamp_ns=int(tokens[at + 2]),
        pending=int(tokens[at + 3]),
    )


def stream_seq_token(width: int) -> int:
    """Where the stream sequence is in an ack subject of ``width`` tokens.

    v1 has 9 tokens; v2 has 11, or 12 with a trailing random token. The consumer sequence,
    timestamp and pending count follow the stream sequence.
    """
    return 5 if width == 9 else 7


def ack_fields(replies: list[bytes], width: int) -> list[list[bytes]] | None:
    """Stream sequence, consumer sequence, timestamp and pending tokens of every reply subject.

    One join and one split for the whole list instead of a split per reply (a tenth of the
    pull's time went to those splits). ``None`` when the replies do not all have ``width``
    tokens and the ``$JS.ACK`` prefix; the caller then splits them one by one.
    """
    count = len(replies)
    flat = b".".join(replies).split(b".")
    if (
        len(flat) != count * width
        or flat[0::width].count(b"$JS") != count
        or flat[1::width].count(b"ACK") != count
    ):
        return None
    start = stream_seq_token(width)
    return [flat[i::width] for i in range(start, start + 4)]


def reply_fields(reply: bytes) -> tuple[int, int, int, int] | None:
    """Stream sequence, consumer sequence, timestamp and pending count of one reply subject.

    ``None`` when ``reply`` is not a ``$JS.ACK`` subject (a status message has none).
    """
    try:
        meta = parse_ack_reply(reply.decode())
    except ValueError:  # UnicodeDecodeError included
        return None
    return meta.stream_seq, meta.consumer_seq, meta.timestamp_ns, meta.pending


def ack_fields_each(replies: list[bytes]) -> list[list[bytes]]:
    """:func:`ack_fields` one reply at a time, whatever form each has."""
    tokens = [r.split(b".") for r in replies]
    starts = [stream_seq_token(len(t)) for t in tokens]
    return [[t[at + i] for t, at in zip(tokens, starts, strict=True)] for i in range(4)]
