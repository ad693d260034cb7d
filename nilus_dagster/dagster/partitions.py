"""Event-time partitions of a pipeline's table: daily (default) or hourly windows, UTC.

The windows are on ``_nats_timestamp`` and include the one that is filling now.

How runs map onto partitions:

* A **sensor run** ingests whatever is pending. It targets the partition range from the window of
  the newest committed message to the current window (the windows its messages can fall in, since
  stream time only moves forward), with the ``nilus/mode=append`` tag. Dagster then records one
  materialization per window it touched, and partition health fills as data arrives.
* Any **other partitioned run** (a UI materialization of some partitions, a CLI
  ``--partition-range`` backfill) replays exactly its time window from the stream, up to the
  committed position, and replaces those rows. Repeating it changes nothing.
* A run **without a partition** (unpartitioned pipelines, or a run launched without one) ingests
  what is pending.
"""

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

import dagster as dg

from nilus_dagster.dagster.constants import (
    DEFAULT_PARTITIONS_START,
    MODE_APPEND,
    MODE_TAG,
    MODE_WINDOW,
)
from nilus_dagster.manifest.loader import Pipeline


def partitions_start(pipeline: Pipeline) -> tuple[str, str | None]:
    """The first partition's date and where it comes from.

    The date is ``YYYY-MM-DD``, or ``YYYY-MM-DD-HH:00`` for hourly partitions. It comes from
    ``spec.dagster.partitions_start``, else the address's ``start_time`` (the stream holds
    nothing the pipeline reads before it), else ``None``, meaning the fallback
    ``DEFAULT_PARTITIONS_START``, which ``nilus-dagster validate`` warns about.
    """
    settings = pipeline.manifest.spec.dagster
    hourly = settings.partitions == "hourly"
    if settings.partitions_start:
        start = settings.partitions_start
        source: str | None = "spec.dagster.partitions_start"
    elif pipeline.manifest.source.address.start_time is not None:
        moment = pipeline.manifest.source.address.start_time.astimezone(timezone.utc)
        return (moment.strftime("%Y-%m-%d-%H:00") if hourly else moment.strftime("%Y-%m-%d")), (
            "spec.source.address.start_time"
        )
    else:
        start, source = DEFAULT_PARTITIONS_START, None
    return (f"{start}-00:00" if hourly and len(start) == 10 else start), source


def build_partitions_def(pipeline: Pipeline) -> dg.TimeWindowPartitionsDefinition | None:
    """The pipeline's partitions (``spec.dagster.partitions``); ``None`` when ``none``.

    They start at :func:`partitions_start`, so a new pipeline shows no missing partitions
    from before its stream.

    Raises:
        DagsterInvalidDefinitionError: ``spec.dagster.partitions_start`` is not a date.
    """
    settings = pipeline.manifest.spec.dagster
    if settings.partitions == "none":
        return None
    start, _ = partitions_start(pipeline)
    if settings.partitions == "hourly":
        return dg.HourlyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")
    return dg.DailyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")


def run_mode(tags: Mapping[str, str], partitioned: bool) -> str:
    """``append`` or ``window`` for a run with these tags (see the module docstring)."""
    requested = tags.get(MODE_TAG)
    if requested in (MODE_APPEND, MODE_WINDOW):
        return requested
    return MODE_WINDOW if partitioned else MODE_APPEND


def sensor_partition_range(
    partitions_def: dg.TimeWindowPartitionsDefinition,
    newest_committed_age_seconds: float | None,
    now: datetime | None = None,
) -> dg.PartitionKeyRange | None:
    """The windows a run ingesting what is pending now writes to.

    Pending messages are newer than the newest committed one, so they fall between its window
    and the current one. With an empty table nothing is known about the backlog's age: the range
    is the current window alone (a backfill of older windows fills them when needed).
    """
    now = now or datetime.now(timezone.utc)
    first_key = partitions_def.get_first_partition_key()
    if first_key is None:
        return None
    first_start = partitions_def.time_window_for_partition_key(first_key).start
    if now < first_start:
        return None
    # The window holding `now` (it exists: the partitions include the one filling now).
    last = partitions_def.get_partition_key_for_timestamp(now.timestamp())
    start = last
    if newest_committed_age_seconds is not None:
        newest = now - timedelta(seconds=max(0.0, newest_committed_age_seconds))
        start = (
            first_key
            if newest < first_start
            else partitions_def.get_partition_key_for_timestamp(newest.timestamp())
        )
    return dg.PartitionKeyRange(start=start, end=last)
