"""Reading a run of plain MSG frames of one pull inbox at once, in C where it was compiled.

:class:`~nilus_dagster.jetstream.inbox.FastParser` hands every read to :data:`read_bulk` first
and reads frame by frame whatever it leaves. Both versions fill the same columns;
:func:`read_bulk_compiled` (``_frames.c``, built when the package is installed) makes only the
objects the inbox keeps and reads the reply subjects on the way: a 200k-order drain into
PostgreSQL took about 0.45 CPU-s less with it (benchmarks/README.md).
"""

from typing import TYPE_CHECKING

try:
    from nilus_dagster.jetstream import _frames  # type: ignore[attr-defined]
except ImportError:  # installed without its C part (no compiler): frames are read in Python
    _frames = None

if TYPE_CHECKING:
    from nilus_dagster.jetstream.inbox import ColumnInbox

COMPILED = _frames is not None
"""Whether the compiled bulk read was built and is used."""

_OTHER_WHITESPACE = (b"\t", b"\n", b"\x0b", b"\x0c", b"\r")


def read_bulk_compiled(
    data: bytes, pos: int, inboxes: "dict[int, ColumnInbox]"
) -> "tuple[int, ColumnInbox, int, int] | None":
    """:func:`read_bulk_python` in C (``_frames.c``): the same columns, fewer objects.

    The reply subjects are read on the way (:attr:`ColumnInbox.acks`). It reads the run of
    plain MSG frames of one sid from ``pos`` up to whatever is not one (a frame of another kind
    or sid, a frame cut by the end of the read), which the caller then reads frame by frame,
    where the Python version gives up on the whole read.
    """
    done = _frames.bulk_frames(data, pos)
    if done is None:
        return None
    end, sid, subjects, replies, payloads, frames, payload_bytes, acks = done
    inbox = inboxes.get(sid)
    if inbox is None:
        return None
    inbox.add_run(subjects, replies, payloads, acks)
    return end, inbox, frames, payload_bytes


def read_bulk_python(
    data: bytes, pos: int, inboxes: "dict[int, ColumnInbox]"
) -> "tuple[int, ColumnInbox, int, int] | None":
    r"""Read every complete frame from ``pos`` on at once, if all are plain MSGs of one inbox.

    A busy pull inbox receives nothing else, so a read from the socket is usually a run of
    ``MSG <subject> <sid> <reply> <size>\r\n<payload>\r\n`` frames and a partial one. Split at
    every CRLF, those are alternately control lines and payloads, and all the work is a few
    calls over whole lists (no Python statement per message). The split is only trusted when
    every control line is a 5-token MSG of the same registered sid and every payload has
    exactly its declared size: a payload holding a CRLF shows up as a piece shorter than
    declared, any other operation (PING, a status HMSG) as a malformed control line. Then the
    caller reads frame by frame instead.

    Returns:
        ``(position after the frames read, inbox, frames, payload bytes)``, or ``None``.
    """
    pieces = data[pos:].split(b"\r\n")
    # The last piece is incomplete (or empty); a control line without its payload waits too.
    frames = (len(pieces) - 1) // 2
    if not frames:
        return None
    controls = pieces[0 : 2 * frames : 2]
    payloads = pieces[1 : 2 * frames : 2]
    joined = b" ".join(controls)
    tokens = joined.split(b" ")
    if len(tokens) != 5 * frames or tokens[0::5].count(b"MSG") != frames:
        return None
    if any(space in joined for space in _OTHER_WHITESPACE):
        return None  # nats-py separates arguments at any whitespace: read frame by frame
    sids = tokens[2::5]
    if sids.count(sids[0]) != frames:
        return None
    try:
        inbox = inboxes.get(int(sids[0]))
        sizes = list(map(int, tokens[4::5]))
    except ValueError:
        return None
    if inbox is None or sizes != list(map(len, payloads)):
        return None
    inbox.add_run(tokens[1::5], tokens[3::5], payloads, None)  # the puller reads the replies
    payload_bytes = sum(sizes)
    end = pos + sum(map(len, controls)) + payload_bytes + 4 * frames
    return end, inbox, frames, payload_bytes


read_bulk = read_bulk_python if _frames is None else read_bulk_compiled
"""The bulk read :class:`~nilus_dagster.jetstream.inbox.FastParser` uses: the compiled one
where it was built."""
