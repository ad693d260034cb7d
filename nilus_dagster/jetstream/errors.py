"""What can go wrong talking to NATS, as types: one base class, and whether trying again helps.

Callers decide on the type and on :attr:`TransportError.retryable`, never on the wording of a
message, so a reworded message cannot change what is retried. The source turns these into
:class:`~nilus_dagster.errors.SourceError` with a text a person can act on
(:mod:`nilus_dagster.jetstream.diagnostics`).
"""

import re

import nats.errors

# JetStream API error codes (``err_code``) acted on.
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_CONSUMER_START_CHANGED = 10012  # a durable of that name exists with another start
ERR_NO_MESSAGE = 10037
ERR_CLUSTER_NOT_AVAILABLE = 10008  # "JetStream system temporarily unavailable"
ERR_JS_NOT_ENABLED_ACCOUNT = 10039
ERR_JS_NOT_ENABLED = 10076
ERR_FILTER_NOT_IN_STREAM = 10093

JS_NOT_ENABLED_CODES = (ERR_JS_NOT_ENABLED_ACCOUNT, ERR_JS_NOT_ENABLED)
# A server that is starting or restarting answers these for a moment.
_PASSING_CODES = (ERR_CLUSTER_NOT_AVAILABLE, *JS_NOT_ENABLED_CODES)

_VIOLATION = re.compile(
    r"permissions violation for (?P<kind>publish|subscription) to \"?(?P<subject>[^\"\s']+)",
    re.IGNORECASE,
)


# What nats-py raises for a publish or a subscription on a connection that closed or is going
# away: the server behind it stopped or restarted while a call was on its way.
NATS_CONNECTION_GONE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


class TransportError(Exception):
    """A request to NATS or a pull that did not go through.

    Attributes:
        retryable: Whether the same request may succeed later (after reconnecting or
            recreating the consumer); ``False`` for refusals that only a person can fix.
    """

    retryable: bool = False


class JsApiError(TransportError):
    """The JetStream API answered with an error object."""

    def __init__(self, subject: str, code: int, err_code: int, description: str):
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.subject = subject
        self.code = code
        self.err_code = err_code
        self.description = description

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        """JetStream unavailable or not (yet) enabled: what a restarting server answers."""
        return self.err_code in _PASSING_CODES


class NoResponders(TransportError):
    """Nobody answers the subject (JetStream off, or no such consumer)."""

    retryable = True

    def __init__(self, subject: str):
        super().__init__(f"no responders for {subject}")
        self.subject = subject


class RequestTimeout(TransportError):
    """No answer within the request timeout."""

    retryable = True

    def __init__(self, subject: str, timeout: float):
        super().__init__(f"no answer to {subject} within {timeout:g}s")
        self.subject = subject
        self.timeout = timeout


class ConnectionLost(TransportError):
    """The connection closed while a request was waiting, or could not be made again."""

    retryable = True


class PermissionViolation(TransportError):
    """The server refused a publish or a subscription for lack of permission.

    nats-py lower-cases the server's error text, so ``subject`` may be lower-cased; compare with
    :meth:`about` and report the subject you sent.
    """

    def __init__(self, kind: str, subject: str):
        super().__init__(f"permissions violation for {kind} to {subject}")
        self.kind = kind  # "publish" or "subscribe"
        self.subject = subject

    def about(self, subject: str) -> bool:
        """Whether this refusal is about ``subject``."""
        return self.subject.lower() == subject.lower()

    @property
    def on_inbox(self) -> bool:
        """A refused subscription to reply inboxes: every request's answer is lost."""
        return self.kind == "subscribe" and self.subject.lower().startswith("_inbox.")


class PullInterrupted(TransportError):
    """The pull cannot continue on this consumer; the caller recreates it (or reconnects).

    Attributes:
        reason: What happened, for the message.
        connection_lost: The connection closed (no need to check whether it still answers).
        fatal: Recreating the consumer will not help (a refusal, a setting the server rejects).
    """

    def __init__(self, reason: str, *, connection_lost: bool = False, fatal: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.connection_lost = connection_lost
        self.fatal = fatal

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        """Everything but a fatal interruption is retried on a new consumer."""
        return not self.fatal


def parse_violation(text: str) -> PermissionViolation | None:
    """The permission violation a server error text reports, if it is one.

    This reads the server's ``-ERR`` text: the protocol has no code for it.
    """
    match = _VIOLATION.search(text)
    if not match:
        return None
    kind = "publish" if match.group("kind").lower() == "publish" else "subscribe"
    return PermissionViolation(kind, match.group("subject"))
