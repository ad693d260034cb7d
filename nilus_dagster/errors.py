"""The exceptions nilus_dagster raises: each one says what is wrong and what to do."""

from collections.abc import Sequence
from dataclasses import dataclass


class NilusError(Exception):
    """Base class for every error this package raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a manifest: where it is and how to fix it."""

    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class ManifestError(NilusError):
    """A manifest (or a depots/secrets file) is malformed or incomplete.

    Its text is one ``FILE: FIELD: message`` line per problem.
    """

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PlaceholderError(NilusError):
    """A ``{PLACEHOLDER}`` in an address has no value in the environment at run time."""


class SourceError(NilusError):
    """The NATS JetStream source cannot be used as configured (auth, stream, subject, server).

    Attributes:
        retryable: Whether the same step may succeed if tried again a little later (a server
            restarting, a connection refused for a moment); a source that is recovering from a
            lost connection keeps trying then, within its time budget.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class SinkError(NilusError):
    """The Delta sink cannot be written as configured."""


class PositionError(NilusError):
    """The committed position and the stream disagree in a way that needs a person."""
