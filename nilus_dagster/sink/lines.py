"""Payloads joined into the JSON lines of one Arrow read, in C where it was compiled.

:class:`~nilus_dagster.sink.decode.BatchDecoder` reads a batch in one Arrow call when every
payload is one line starting with ``{``: then row ``i`` of the read is payload ``i`` whenever it
has as many rows as payloads. :func:`join_lines` checks that and joins them; the compiled one
(``_lines.c``, built when the package is installed) scans each payload in place and copies it
once, instead of counting over the joined bytes twice (benchmarks/README.md).
"""

from collections.abc import Sequence
from typing import NamedTuple

try:
    from nilus_dagster.sink import _lines  # type: ignore[attr-defined]
except ImportError:  # installed without its C part (no compiler): joined and checked in Python
    _lines = None

COMPILED = _lines is not None
"""Whether the compiled join was built and is used."""


class Lines(NamedTuple):
    """Payloads joined with line feeds, for one Arrow JSON read.

    Attributes:
        joined: The payloads, separated by line feeds.
        longest: Size of the longest payload.
        ascii: Whether every byte is ASCII (else the text still has to be checked for UTF-8).
    """

    joined: bytes
    longest: int
    ascii: bool


def join_lines_python(payloads: Sequence[bytes]) -> Lines | None:
    """The payloads as JSON lines, or ``None`` unless each is one line starting with ``{``.

    A payload that is empty, starts with anything else, or holds a line feed or a carriage
    return returns ``None``: Arrow could skip it, split it or join it with its neighbour, so
    its rows could no longer be matched to the messages.
    """
    n = len(payloads)
    if not n:
        return None
    joined = b"\n".join(payloads)
    # With exactly n - 1 line breaks all of them are separators; each followed by '{' and a
    # first '{' mean every payload starts with one (two counts, not a slice per payload).
    if (
        joined.count(b"\n") != n - 1
        or b"\r" in joined
        or not joined.startswith(b"{")
        or joined.count(b"\n{") != n - 1
    ):
        return None
    return Lines(joined, max(map(len, payloads)), joined.isascii())


def join_lines_compiled(payloads: Sequence[bytes]) -> Lines | None:
    """:func:`join_lines_python` in C (``_lines.c``): the same result, without the counts."""
    try:
        done = _lines.join_lines(payloads if type(payloads) is list else list(payloads))
    except TypeError:  # payloads that are not exactly bytes: as Python joins them
        return join_lines_python(payloads)
    return None if done is None else Lines(*done)


join_lines = join_lines_python if _lines is None else join_lines_compiled
"""The join :class:`~nilus_dagster.sink.decode.BatchDecoder` uses: the compiled one where it
was built."""
