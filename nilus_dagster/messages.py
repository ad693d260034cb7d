"""The one data type that crosses layers: a batch of JetStream messages, column by column.

The source fills it without building a Python object per message; the sink turns it into Arrow.
"""

from bisect import bisect_right
from dataclasses import dataclass, field


@dataclass
class MessageBatch:
    """Messages pulled from one stream, in stream order, without duplicate sequences.

    Attributes:
        sequences: Stream sequence of each message, strictly increasing.
        timestamps_ns: Time each message was stored in the stream (ns since the epoch, UTC).
        subjects: Subject of each message.
        payloads: Message data, untouched.
        headers: Per-message headers, or ``None`` for the whole batch when no message had any.
        num_pending: Messages on the consumer's subject still pending after the last one.
    """

    sequences: list[int] = field(default_factory=list)
    timestamps_ns: list[int] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str] | None] | None = None
    num_pending: int = 0

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def nbytes(self) -> int:
        """Payload bytes in the batch."""
        return sum(map(len, self.payloads))

    @property
    def first_seq(self) -> int:
        """The batch's first stream sequence."""
        return self.sequences[0]

    @property
    def last_seq(self) -> int:
        """The batch's last stream sequence."""
        return self.sequences[-1]

    def extend(self, other: "MessageBatch") -> None:
        """Append ``other`` (which must come later in the stream) to this batch."""
        if self.headers is not None or other.headers is not None:
            mine = self.headers if self.headers is not None else [None] * len(self)
            theirs = other.headers if other.headers is not None else [None] * len(other)
            self.headers = mine + theirs
        self.sequences.extend(other.sequences)
        self.timestamps_ns.extend(other.timestamps_ns)
        self.subjects.extend(other.subjects)
        self.payloads.extend(other.payloads)
        self.num_pending = other.num_pending

    def split(self, count: int) -> tuple["MessageBatch", "MessageBatch"]:
        """The first ``count`` messages and the rest."""
        return self.slice(0, count), self.slice(count, len(self))

    def slice(self, start: int, stop: int) -> "MessageBatch":
        """The messages from index ``start`` up to (not including) ``stop``."""
        return MessageBatch(
            sequences=self.sequences[start:stop],
            timestamps_ns=self.timestamps_ns[start:stop],
            subjects=self.subjects[start:stop],
            payloads=self.payloads[start:stop],
            headers=self.headers[start:stop] if self.headers is not None else None,
            num_pending=self.num_pending,
        )

    def select(self, indices: list[int]) -> "MessageBatch":
        """The messages at ``indices`` (in order)."""
        return MessageBatch(
            sequences=[self.sequences[i] for i in indices],
            timestamps_ns=[self.timestamps_ns[i] for i in indices],
            subjects=[self.subjects[i] for i in indices],
            payloads=[self.payloads[i] for i in indices],
            headers=[self.headers[i] for i in indices] if self.headers is not None else None,
            num_pending=self.num_pending,
        )

    def after(self, position: int) -> "MessageBatch":
        """The messages with a sequence above ``position`` (all of them, usually)."""
        if not self.sequences or self.sequences[0] > position:
            return self
        return self.slice(bisect_right(self.sequences, position), len(self))
