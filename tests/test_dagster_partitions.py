"""Which windows a sensor run touches, and how a run picks append or window mode."""

from datetime import datetime, timezone

import dagster as dg
from conftest import write_pipeline_file

from nilus_dagster.dagster.partitions import (
    build_partitions_def,
    run_mode,
    sensor_partition_range,
)
from nilus_dagster.manifest import parse_pipeline

DAILY = dg.DailyPartitionsDefinition(start_date="2025-01-01", end_offset=1, timezone="UTC")
HOURLY = dg.HourlyPartitionsDefinition(start_date="2025-01-01-00:00", end_offset=1)
NOW = datetime(2025, 3, 10, 14, 30, tzinfo=timezone.utc)


def test_range_runs_from_the_newest_committed_window_to_now():
    three_days = 3 * 86400 + 60

    assert sensor_partition_range(DAILY, three_days, NOW) == dg.PartitionKeyRange(
        "2025-03-07", "2025-03-10"
    )
    assert sensor_partition_range(HOURLY, 90 * 60, NOW) == dg.PartitionKeyRange(
        "2025-03-10-13:00", "2025-03-10-14:00"
    )


def test_fresh_table_position_gives_the_current_window_only():
    assert sensor_partition_range(DAILY, 5.0, NOW) == dg.PartitionKeyRange(
        "2025-03-10", "2025-03-10"
    )
    # Empty table: nothing is known about the backlog's age.
    assert sensor_partition_range(DAILY, None, NOW) == dg.PartitionKeyRange(
        "2025-03-10", "2025-03-10"
    )


def test_range_is_clamped_to_the_first_partition():
    a_year = 365 * 86400.0

    assert sensor_partition_range(DAILY, a_year, NOW) == dg.PartitionKeyRange(
        "2025-01-01", "2025-03-10"
    )
    # Negative ages (clock skew between NATS and Dagster) count as now.
    assert sensor_partition_range(DAILY, -30.0, NOW).start == "2025-03-10"


def test_no_range_before_the_partitions_start():
    assert sensor_partition_range(DAILY, None, datetime(2024, 6, 1, tzinfo=timezone.utc)) is None


def test_run_mode_defaults_and_tags():
    assert run_mode({}, partitioned=False) == "append"
    assert run_mode({}, partitioned=True) == "window"
    assert run_mode({"nilus/mode": "append"}, partitioned=True) == "append"
    assert run_mode({"nilus/mode": "window"}, partitioned=True) == "window"
    assert run_mode({"nilus/mode": "bogus"}, partitioned=True) == "window"


def test_partitions_start_at_the_setting_else_the_address_start_time(tmp_path):
    def first_key(query: str = "", dagster: str = "") -> str | None:
        path = write_pipeline_file(tmp_path, "p", query=query)
        if dagster:
            path.write_text(path.read_text() + f"  dagster: {dagster}\n")
        partitions = build_partitions_def(parse_pipeline(path))
        return partitions.get_first_partition_key() if partitions else None

    assert first_key(dagster="{partitions_start: '2026-02-03'}") == "2026-02-03"
    # No setting: the day the pipeline starts reading (nothing in the stream before it counts).
    assert first_key(query="&start_time=2026-04-05T22:30:00%2B02:00") == "2026-04-05"
    hourly = "{partitions: hourly}"
    assert first_key(query="&start_time=2026-04-05T22:30:00Z", dagster=hourly) == (
        "2026-04-05-22:00"
    )
    # Neither: the fallback, which `nilus-dagster validate` warns about.
    assert first_key() == "2020-01-01"
