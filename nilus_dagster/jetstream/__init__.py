"""The NATS JetStream side: connect and authenticate, manage consumers, pull fast, measure lag.

No Dagster here: the engine drives :class:`JetStreamSource`; :class:`BulkPuller` is the fast pull
loop on its own, for benchmarks.
"""

from nilus_dagster.jetstream.ack import parse_ack_reply
from nilus_dagster.jetstream.errors import PullInterrupted, TransportError
from nilus_dagster.jetstream.pull import BulkPuller
from nilus_dagster.jetstream.source import JetStreamSource
from nilus_dagster.jetstream.state import StreamState

__all__ = [
    "BulkPuller",
    "JetStreamSource",
    "PullInterrupted",
    "StreamState",
    "TransportError",
    "parse_ack_reply",
]
