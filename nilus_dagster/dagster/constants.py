"""Names shared by the asset, the sensor and the checks: run tags and metadata keys."""

PIPELINE_TAG = "nilus/pipeline"
"""Run tag naming the pipeline; the sensor looks for runs in flight by it."""
MODE_TAG = "nilus/mode"
"""Run tag: ``append`` (ingest what is pending) or ``window`` (replace the partition range)."""
MODE_APPEND = "append"
MODE_WINDOW = "window"
POSITION_TAG = "nilus/position"
"""Run tag set by the sensor: the committed position the run was requested at."""

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

META_MANIFEST = "nilus/manifest"
META_SOURCE_ADDRESS = "nilus/source_address"
META_SINK_ADDRESS = "nilus/sink_address"
META_TABLE_URI = "nilus/table_uri"
META_STRATEGY = "nilus/incremental_strategy"
META_POSITION = "nilus/position"
META_STREAM = "nats/stream"
META_SUBJECT = "nats/subject"
META_COLUMN_SCHEMA = "dagster/column_schema"
META_PARTITION_ROW_COUNT = "dagster/partition_row_count"

CHECK_SEQUENCE_LAG = "sequence_lag_within_bound"
CHECK_NO_GAP = "no_gap"
CHECK_DEAD_LETTERS = "dead_letters"

DEFAULT_GROUP = "nilus"
DEFAULT_PARTITIONS_START = "2020-01-01"
"""The first partition of a pipeline that says neither ``spec.dagster.partitions_start`` nor a
``start_time`` (``nilus-dagster validate`` warns about it)."""
