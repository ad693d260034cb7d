"""What a run did and what the stream looks like: the figures behind the run metadata."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LagReport:
    """The stream's state against the committed position (no messages consumed).

    Attributes:
        stream: JetStream stream name.
        subject: The pipeline's subject.
        position: Last stream sequence committed to the table (0 when nothing is).
        stream_first_seq: Oldest sequence the stream still holds.
        stream_last_seq: Newest sequence in the stream (any subject).
        sequence_lag: Messages on the subject after ``position``, not yet in the table.
        gap: Sequences lost to retention after ``position`` (``stream_first_seq - position - 1``
            when positive, else 0).
        lag_seconds: Age of the newest committed message, or ``None`` with an empty table.
        table_uri: The Delta table.
        problem: Why the position cannot be used as is (a recreated stream), else ``None``.
    """

    stream: str
    subject: str
    position: int
    stream_first_seq: int
    stream_last_seq: int
    sequence_lag: int
    gap: int
    lag_seconds: float | None
    table_uri: str
    problem: str | None = None

    @property
    def pending(self) -> bool:
        """Whether messages wait on the subject past the committed position."""
        return self.sequence_lag > 0


@dataclass(frozen=True)
class RunReport:
    """What one run committed. Every field maps to a run metadata key (see ``metadata()``).

    ``durable`` names the durable consumer the run kept at the table's position (``None`` when
    there is none, and for window replays, which leave it alone); ``realign_reasons`` says why
    the run found it away from the table's position (empty when it was in place).
    ``row_count_estimated`` says ``row_count`` is the store's estimate (a PostgreSQL table past
    a million rows), not a count; ``row_count`` is ``None`` where the store could give neither
    (a PostgreSQL user without SELECT on a table not analyzed yet).
    """

    pipeline: str
    stream: str
    subject: str
    table_uri: str
    first_seq: int | None
    last_seq: int | None
    position: int
    stream_last_seq: int
    sequence_lag: int
    lag_seconds: float | None
    gap: int
    row_count: int | None
    rows_written: int
    dead_letters: int
    messages: int
    bytes: int
    commits: int
    duration_seconds: float
    durable: str | None = None
    realign_reasons: tuple[str, ...] = ()
    row_count_estimated: bool = False

    @property
    def realigned(self) -> bool:
        """Whether the run found the durable consumer away from the table's position."""
        return bool(self.realign_reasons)

    @property
    def messages_per_second(self) -> float:
        """Messages a second over the run."""
        return self.messages / self.duration_seconds if self.duration_seconds > 0 else 0.0

    def metadata(self) -> dict[str, Any]:
        """The run metadata, under the names the design fixes (plain Python values)."""
        return {
            "nats/stream": self.stream,
            "nats/subject": self.subject,
            # A run that committed nothing reports the empty range just past the position,
            # which keeps both series continuous on the asset's plots (0 would spike them).
            "nats/first_seq": self.first_seq if self.first_seq is not None else self.position + 1,
            "nats/last_seq": self.last_seq if self.last_seq is not None else self.position,
            "nats/stream_last_seq": self.stream_last_seq,
            "nats/sequence_lag": self.sequence_lag,
            "nats/lag_seconds": self.lag_seconds if self.lag_seconds is not None else 0.0,
            "nats/gap": self.gap,
            **({"dagster/row_count": self.row_count} if self.row_count is not None else {}),
            "nilus/rows_written": self.rows_written,
            "nilus/dead_letters": self.dead_letters,
            "nilus/messages_per_second": round(self.messages_per_second, 1),
            "nilus/duration_seconds": round(self.duration_seconds, 3),
            "nilus/table_uri": self.table_uri,
            **({"nilus/durable": self.durable} if self.durable else {}),
            **({"nilus/realigned": "; ".join(self.realign_reasons)} if self.realigned else {}),
            # Only where the row count is the store's estimate (a large PostgreSQL table).
            **({"nilus/row_count_estimated": True} if self.row_count_estimated else {}),
        }
