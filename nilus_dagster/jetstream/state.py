"""Stream state as the JetStream API reports it, and NATS subject matching."""

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from nilus_dagster.times import as_utc


@dataclass(frozen=True)
class StreamState:
    """A stream's configuration and contents at one moment.

    Attributes:
        name: Stream name.
        first_seq: Oldest sequence still stored (``last_seq + 1`` when the stream is empty).
        last_seq: Newest sequence ever stored (0 for a stream never written to).
        messages: Messages stored now (all subjects).
        created: When the stream was created (UTC); a change means it was deleted and recreated.
        subjects: The stream's configured subjects.
    """

    name: str
    first_seq: int
    last_seq: int
    messages: int
    created: datetime
    subjects: tuple[str, ...]

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "StreamState":
        """Build from a ``$JS.API.STREAM.INFO`` answer."""
        config = info.get("config") or {}
        state = info.get("state") or {}
        return cls(
            name=str(config.get("name", "")),
            first_seq=int(state.get("first_seq", 0) or 0),
            last_seq=int(state.get("last_seq", 0) or 0),
            messages=int(state.get("messages", 0) or 0),
            created=parse_time(str(info.get("created") or "1970-01-01T00:00:00Z")),
            subjects=tuple(config.get("subjects") or ()),
        )

    def gap_after(self, position: int) -> int:
        """Messages after ``position`` that retention or a purge removed before they were read.

        ``first_seq - position - 1`` when positive; 0 when nothing was committed yet (a first
        run starts wherever the stream starts).
        """
        if position <= 0 or self.first_seq <= position + 1:
            return 0
        return self.first_seq - position - 1

    def recreated_since(self, position: int, created: datetime | None = None) -> str | None:
        """Why this looks like another stream than the one ``position`` was read from, if it does.

        Args:
            position: The last committed sequence.
            created: The stream creation time recorded with that position, if any.
        """
        if created is not None and created != self.created:
            return (
                f"stream {self.name} was created at {self.created.isoformat()}, but the position "
                f"{position} was read from a stream created at {created.isoformat()}: it was "
                "deleted and recreated"
            )
        if position > self.last_seq:
            return (
                f"stream {self.name} ends at sequence {self.last_seq}, before the committed "
                f"position {position}: it was deleted and recreated (or purged and reset)"
            )
        return None


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as the server writes it (nanoseconds, ``Z``) as an aware UTC datetime."""
    value = text.strip()
    if value.endswith("Z") or value.endswith("z"):
        value = value[:-1] + "+00:00"
    # Python takes at most 6 fractional digits; the server writes up to 9.
    if "." in value:
        head, _, rest = value.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        fraction, tail = rest[:digits], rest[digits:]
        value = f"{head}.{fraction[:6].ljust(6, '0')}{tail}"
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def parse_time_ns(ns: int) -> datetime:
    """Nanoseconds since the epoch as an aware UTC datetime."""
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)


def format_time(moment: datetime) -> str:
    """An aware datetime as RFC 3339 UTC, for consumer configs."""
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some concrete subject matches both ``a`` and ``b`` (wildcards allowed in both)."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            # '>' needs at least one more token, which the other side must allow.
            return (x is not None) and (y is not None)
        if x is None or y is None:
            return False
        if x != y and x != "*" and y != "*":
            return False
    return True


def subject_in(subject: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``subject`` can carry messages of a stream bound to ``patterns``."""
    return any(subjects_overlap(subject, pattern) for pattern in patterns)
