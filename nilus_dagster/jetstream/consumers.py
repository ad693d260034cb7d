"""Pull consumer configs: what we ask the server for, and checking what it says it made.

Every consumer here is a pull consumer on one ``filter_subject`` that starts at a given stream
sequence with an instant replay. Runs read through readers of their own, which never ack
(``ack_policy=none``) and disappear after ``inactive_threshold``. A durable named in the address
is only positioned (it mirrors the table's position) and keeps the address's ack policy.

Configs and answers are nats-py's typed models (:class:`~nats.js.api.ConsumerConfig`,
:class:`~nats.js.api.ConsumerInfo`); :mod:`nilus_dagster.jetstream.admin` sends and reads them.
"""

from dataclasses import dataclass
from enum import Enum

from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, ReplayPolicy
from nats.nuid import NUID

from nilus_dagster.errors import SourceError

_nuid = NUID()

# Unacked messages a durable may have outstanding. The server default (1000) stalls a pull that
# gathers a large commit before acking it, silently; -1 means no limit.
UNLIMITED_ACK_PENDING = -1
DEFAULT_ACK_WAIT_SECONDS = 300.0
# Seconds without pulls after which the server deletes a run's reader: longer than the
# slowest commit.
DEFAULT_INACTIVE_THRESHOLD_SECONDS = 60.0
PROBE_INACTIVE_THRESHOLD_SECONDS = 10.0
_RESETTABLE_DELIVER_POLICIES = ("all", "by_start_sequence", "by_start_time")


@dataclass(frozen=True)
class ConsumerSpec:
    """What the consumers of one source look like.

    Attributes:
        stream: Stream name.
        subject: The filter subject.
        durable: Durable consumer name to keep at the table's position, or ``None``.
        ack_policy: ``none``, ``all`` or ``explicit`` (the durable's).
        inactive_threshold: Seconds without pulls after which the server deletes a reader.
        ack_wait: The durable's redelivery wait (ack policies other than none). Long: should
            another client pull from it, its messages come back late rather than interleaved.
    """

    stream: str
    subject: str
    durable: str | None = None
    ack_policy: str = "none"
    inactive_threshold: float = DEFAULT_INACTIVE_THRESHOLD_SECONDS
    ack_wait: float = DEFAULT_ACK_WAIT_SECONDS


@dataclass(frozen=True)
class Misalignment:
    """Why an existing durable cannot be used as it is to read from a sequence.

    Attributes:
        reason: What is wrong, for the log and the run's metadata.
        position_only: Only its position differs (it is ahead or behind). With a filter, the
            server may have moved past sequences of other subjects, so the caller can check
            whether any message of the subject lies in between before moving it.
    """

    reason: str
    position_only: bool = False

    def __str__(self) -> str:
        return self.reason


def new_ephemeral_name(prefix: str = "nilus") -> str:
    """A fresh consumer name (letters and digits only, valid everywhere)."""
    return f"{prefix}_{_nuid.next().decode()}"


def reader_config(spec: ConsumerSpec, name: str, start_seq: int) -> ConsumerConfig:
    """The config of a run's own reader starting at ``start_seq``."""
    return ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        replay_policy=ReplayPolicy.INSTANT,
        filter_subject=spec.subject,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=spec.inactive_threshold,
        # A reader need not survive a server restart: the run recreates it anyway.
        mem_storage=True,
    )


def durable_config(spec: ConsumerSpec, start_seq: int) -> ConsumerConfig:
    """The config of the durable, positioned at ``start_seq``."""
    assert spec.durable is not None
    acks = spec.ack_policy != "none"
    return ConsumerConfig(
        name=spec.durable,
        durable_name=spec.durable,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        replay_policy=ReplayPolicy.INSTANT,
        filter_subject=spec.subject,
        ack_policy=AckPolicy(spec.ack_policy),
        ack_wait=spec.ack_wait if acks else None,
        max_ack_pending=UNLIMITED_ACK_PENDING if acks else None,
    )


def probe_config(
    subject: str,
    name: str,
    *,
    start_seq: int | None = None,
    start_time: str | None = None,
    last: bool = False,
) -> ConsumerConfig:
    """A short-lived consumer that only answers a question (pending count, start sequence)."""
    config = ConsumerConfig(
        name=name,
        ack_policy=AckPolicy.NONE,
        replay_policy=ReplayPolicy.INSTANT,
        filter_subject=subject,
        inactive_threshold=PROBE_INACTIVE_THRESHOLD_SECONDS,
        mem_storage=True,
    )
    if last:
        return config.evolve(deliver_policy=DeliverPolicy.LAST)
    if start_time is not None:
        # nats-py sends a string as it is (the server's RFC 3339 form, made by the caller).
        return config.evolve(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start_time)
    return config.evolve(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq or 1)
    )


def counting_config(name: str, start_seq: int) -> ConsumerConfig:
    """A short-lived consumer without a filter.

    Its pending count is how many messages of any subject the stream holds from ``start_seq``
    on.
    """
    return ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        ack_policy=AckPolicy.NONE,
        replay_policy=ReplayPolicy.INSTANT,
        inactive_threshold=PROBE_INACTIVE_THRESHOLD_SECONDS,
        mem_storage=True,
    )


def _text(value: object) -> object:
    """A config value as the server writes it (nats-py's enums are ``str`` subclasses)."""
    return value.value if isinstance(value, Enum) else value


def _filter_of(config: ConsumerConfig) -> str | None:
    if config.filter_subject:
        return str(config.filter_subject)
    subjects = config.filter_subjects or []
    if len(subjects) == 1:
        return str(subjects[0])
    return None


def verify_created(requested: ConsumerConfig, info: ConsumerInfo, *, server: str) -> None:
    """Check that the server made the consumer we asked for.

    A server that does not know a setting drops it silently (2.9 drops ``filter_subjects``, for
    one); reading such a consumer would give wrong data, so that is an error.

    Raises:
        SourceError: A setting is missing or different in the returned config.
    """
    got = info.config
    problems = []
    if _filter_of(got) != requested.filter_subject:
        problems.append(
            f"filter_subject is {_filter_of(got)!r}, asked {requested.filter_subject!r}"
        )
    for key in ("deliver_policy", "ack_policy", "replay_policy", "durable_name"):
        asked, made = _text(getattr(requested, key)), _text(getattr(got, key))
        if asked is not None and made != asked:
            problems.append(f"{key} is {made!r}, asked {asked!r}")
    for key in ("opt_start_seq", "opt_start_time"):
        asked = getattr(requested, key)
        if asked is not None and not getattr(got, key):
            problems.append(f"{key} is missing, asked {asked!r}")
    if requested.opt_start_seq and got.opt_start_seq not in (None, requested.opt_start_seq):
        problems.append(f"opt_start_seq is {got.opt_start_seq}, asked {requested.opt_start_seq}")
    if requested.inactive_threshold is not None and not got.inactive_threshold:
        problems.append("inactive_threshold was dropped (the consumer would never be cleaned up)")
    if problems:
        raise SourceError(
            f"nats-server {server} did not create consumer {requested.name} as asked: "
            + "; ".join(problems)
            + ". It may be too old for this setting (2.9 or later is needed); reading it would "
            "give wrong data, so nothing was read"
        )


def pending(info: ConsumerInfo) -> int:
    """Messages the consumer has still to deliver (its filter applied)."""
    return int(info.num_pending or 0)


def next_sequence(info: ConsumerInfo) -> int:
    """The stream sequence a consumer delivers next (or a later one, with filters)."""
    delivered = info.delivered
    return (int(delivered.stream_seq or 0) if delivered else 0) + 1


def next_delivery(info: ConsumerInfo) -> int:
    """The consumer sequence of the consumer's next delivery."""
    delivered = info.delivered
    return (int(delivered.consumer_seq or 0) if delivered else 0) + 1


def misalignment(info: ConsumerInfo, spec: ConsumerSpec, start_seq: int) -> Misalignment | None:
    """Why an existing durable cannot be used as is to read from ``start_seq`` (or ``None``)."""
    config = info.config
    if config.deliver_subject:
        return Misalignment(f"it is a push consumer (deliver_subject {config.deliver_subject})")
    if _filter_of(config) != spec.subject:
        return Misalignment(f"it filters on {_filter_of(config)!r}, not {spec.subject!r}")
    ack_policy = _text(config.ack_policy) or "none"
    if ack_policy != spec.ack_policy:
        return Misalignment(
            f"its ack_policy is {_text(config.ack_policy)}, the address asks {spec.ack_policy}"
        )
    replay_policy = _text(config.replay_policy) or "instant"
    if replay_policy != "instant":
        return Misalignment(f"its replay_policy is {_text(config.replay_policy)}, not instant")
    unacked = int(info.num_ack_pending or 0)
    if unacked:
        # They would come back after ack_wait, after newer messages: out of order.
        return Misalignment(f"it has {unacked} delivered but unacknowledged messages")
    redelivered = int(info.num_redelivered or 0)
    if redelivered:
        return Misalignment(f"it has {redelivered} messages waiting for redelivery")
    at = next_sequence(info)
    if at > start_seq:
        return Misalignment(
            f"it is ahead: its next sequence is {at}, the table needs {start_seq}",
            position_only=True,
        )
    if at < start_seq:
        return Misalignment(
            f"it is behind: its next sequence is {at}, the table needs {start_seq}",
            position_only=True,
        )
    return None


def resettable(info: ConsumerInfo, spec: ConsumerSpec) -> bool:
    """Whether the 2.14+ reset API can realign the durable in place (same config otherwise)."""
    config = info.config
    return (
        not config.deliver_subject
        and _filter_of(config) == spec.subject
        and (_text(config.ack_policy) or "none") == spec.ack_policy
        and _text(config.deliver_policy) in _RESETTABLE_DELIVER_POLICIES
        and (_text(config.replay_policy) or "instant") == "instant"
    )
