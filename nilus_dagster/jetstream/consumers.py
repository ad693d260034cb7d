"""Pull consumer configs: what we ask the server for, and checking what it says it made.

Every consumer here is a pull consumer on one ``filter_subject`` that starts at a given stream
sequence with an instant replay. Runs read through readers of their own, which never ack
(``ack_policy=none``) and disappear after ``inactive_threshold``. A durable named in the address
is only positioned (it mirrors the table's position) and keeps the address's ack policy.
"""

from dataclasses import dataclass
from typing import Any

from nats.nuid import NUID

from nilus_dagster.errors import SourceError

_nuid = NUID()

# Unacked messages a durable may have outstanding. The server default (1000) stalls a pull that
# gathers a large commit before acking it, silently; -1 means no limit.
UNLIMITED_ACK_PENDING = -1
DEFAULT_ACK_WAIT_SECONDS = 300.0
NS = 1_000_000_000


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
    inactive_threshold: float = 60.0
    ack_wait: float = DEFAULT_ACK_WAIT_SECONDS


def new_ephemeral_name(prefix: str = "nilus") -> str:
    """A fresh consumer name (letters and digits only, valid everywhere)."""
    return f"{prefix}_{_nuid.next().decode()}"


def reader_config(spec: ConsumerSpec, name: str, start_seq: int) -> dict[str, Any]:
    """The ``config`` of a create request for a run's own reader starting at ``start_seq``."""
    return {
        "name": name,
        "deliver_policy": "by_start_sequence",
        "opt_start_seq": max(1, start_seq),
        "replay_policy": "instant",
        "filter_subject": spec.subject,
        "ack_policy": "none",
        "inactive_threshold": int(spec.inactive_threshold * NS),
        # A reader need not survive a server restart: the run recreates it anyway.
        "mem_storage": True,
    }


def durable_config(spec: ConsumerSpec, start_seq: int) -> dict[str, Any]:
    """The ``config`` of a create request for the durable, positioned at ``start_seq``."""
    assert spec.durable is not None
    config: dict[str, Any] = {
        "name": spec.durable,
        "durable_name": spec.durable,
        "deliver_policy": "by_start_sequence",
        "opt_start_seq": max(1, start_seq),
        "replay_policy": "instant",
        "filter_subject": spec.subject,
        "ack_policy": spec.ack_policy,
    }
    if spec.ack_policy != "none":
        config["ack_wait"] = int(spec.ack_wait * NS)
        config["max_ack_pending"] = UNLIMITED_ACK_PENDING
    return config


def probe_config(
    subject: str,
    name: str,
    *,
    start_seq: int | None = None,
    start_time: str | None = None,
    last: bool = False,
) -> dict[str, Any]:
    """A short-lived consumer that only answers a question (pending count, start sequence)."""
    config: dict[str, Any] = {
        "name": name,
        "ack_policy": "none",
        "replay_policy": "instant",
        "filter_subject": subject,
        "inactive_threshold": 10 * NS,
        "mem_storage": True,
    }
    if last:
        config["deliver_policy"] = "last"
    elif start_time is not None:
        config["deliver_policy"] = "by_start_time"
        config["opt_start_time"] = start_time
    else:
        config["deliver_policy"] = "by_start_sequence"
        config["opt_start_seq"] = max(1, start_seq or 1)
    return config


def create_subject(stream: str, name: str, filter_subject: str, prefix: str = "$JS.API") -> str:
    """The create API subject (with the filter in it when it is a literal subject: permissions
    can then be scoped to it)."""
    if "*" in filter_subject or ">" in filter_subject:
        return f"{prefix}.CONSUMER.CREATE.{stream}.{name}"
    return f"{prefix}.CONSUMER.CREATE.{stream}.{name}.{filter_subject}"


def _filter_of(config: dict[str, Any]) -> str | None:
    if config.get("filter_subject"):
        return str(config["filter_subject"])
    subjects = config.get("filter_subjects") or []
    if len(subjects) == 1:
        return str(subjects[0])
    return None


def verify_created(requested: dict[str, Any], info: dict[str, Any], *, server: str) -> None:
    """Check that the server made the consumer we asked for.

    A server that does not know a setting drops it silently (2.9 drops ``filter_subjects``, for
    one); reading such a consumer would give wrong data, so that is an error.

    Raises:
        SourceError: A setting is missing or different in the returned config.
    """
    got = info.get("config") or {}
    problems = []
    if _filter_of(got) != requested["filter_subject"]:
        problems.append(
            f"filter_subject is {_filter_of(got)!r}, asked {requested['filter_subject']!r}"
        )
    for key in ("deliver_policy", "ack_policy", "replay_policy", "durable_name"):
        if key in requested and got.get(key) != requested[key]:
            problems.append(f"{key} is {got.get(key)!r}, asked {requested[key]!r}")
    for key in ("opt_start_seq", "opt_start_time"):
        if key in requested and not got.get(key):
            problems.append(f"{key} is missing, asked {requested[key]!r}")
    if requested.get("opt_start_seq") and got.get("opt_start_seq") not in (
        None,
        requested["opt_start_seq"],
    ):
        problems.append(
            f"opt_start_seq is {got.get('opt_start_seq')}, asked {requested['opt_start_seq']}"
        )
    if "inactive_threshold" in requested and not got.get("inactive_threshold"):
        problems.append("inactive_threshold was dropped (the consumer would never be cleaned up)")
    if problems:
        raise SourceError(
            f"nats-server {server} did not create consumer {requested.get('name')} as asked: "
            + "; ".join(problems)
            + ". It may be too old for this setting (2.9 or later is needed); reading it would "
            "give wrong data, so nothing was read"
        )


def next_sequence(info: dict[str, Any]) -> int:
    """The stream sequence a consumer delivers next (or a later one, with filters)."""
    delivered = info.get("delivered") or {}
    return int(delivered.get("stream_seq", 0) or 0) + 1


def misalignment(info: dict[str, Any], spec: ConsumerSpec, start_seq: int) -> str | None:
    """Why an existing durable cannot be used as is to read from ``start_seq``; ``None`` if it
    can. A reason starting with ``it is ahead`` or ``it is behind`` is about the position only:
    with a filter, the server may have moved past sequences of other subjects, so the caller
    can check whether any message of the subject lies in between (:func:`position_only`)."""
    config = info.get("config") or {}
    if config.get("deliver_subject"):
        return f"it is a push consumer (deliver_subject {config['deliver_subject']})"
    if _filter_of(config) != spec.subject:
        return f"it filters on {_filter_of(config)!r}, not {spec.subject!r}"
    if config.get("ack_policy", "none") != spec.ack_policy:
        return f"its ack_policy is {config.get('ack_policy')}, the address asks {spec.ack_policy}"
    if config.get("replay_policy", "instant") != "instant":
        return f"its replay_policy is {config.get('replay_policy')}, not instant"
    unacked = int(info.get("num_ack_pending", 0) or 0)
    if unacked:
        # They would come back after ack_wait, after newer messages: out of order.
        return f"it has {unacked} delivered but unacknowledged messages"
    redelivered = int(info.get("num_redelivered", 0) or 0)
    if redelivered:
        return f"it has {redelivered} messages waiting for redelivery"
    at = next_sequence(info)
    if at > start_seq:
        return f"it is ahead: its next sequence is {at}, the table needs {start_seq}"
    if at < start_seq:
        return f"it is behind: its next sequence is {at}, the table needs {start_seq}"
    return None


def position_only(reason: str) -> bool:
    """Whether a :func:`misalignment` reason is only about the position."""
    return reason.startswith(("it is ahead", "it is behind"))


def resettable(info: dict[str, Any], spec: ConsumerSpec) -> bool:
    """Whether the 2.14+ reset API can realign the durable in place (same config otherwise)."""
    config = info.get("config") or {}
    return (
        not config.get("deliver_subject")
        and _filter_of(config) == spec.subject
        and config.get("ack_policy", "none") == spec.ack_policy
        and config.get("deliver_policy") in ("all", "by_start_sequence", "by_start_time")
        and config.get("replay_policy", "instant") == "instant"
    )
