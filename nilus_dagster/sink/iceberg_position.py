"""Where an Iceberg table keeps a pipeline's stream position: its snapshot summaries.

Every commit of a pipeline records ``nilus.pipeline``, ``nilus.last_seq`` and
``nilus.stream_created`` in its snapshot summary; the position is that of the newest snapshot
of the pipeline in the current snapshot's ancestry.
"""

from collections.abc import Mapping

from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of

from nilus_dagster.sink.writer import STREAM_CREATED_KEY

PIPELINE_KEY = "nilus.pipeline"
LAST_SEQ_KEY = "nilus.last_seq"


def read_position(table: Table | None, app_id: str) -> tuple[int | None, str | None]:
    """The newest snapshot of ``app_id`` in the current ancestry: its position and created."""
    if table is None:
        return None, None
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        summary = snapshot.summary
        if summary is not None and summary[PIPELINE_KEY] == app_id:
            seq = summary[LAST_SEQ_KEY]
            return (int(seq) if seq else None), summary[STREAM_CREATED_KEY]
    return None, None


def position_summary(
    app_id: str, last_seq: int, stream_created: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """The snapshot summary of a commit of ``app_id`` up to ``last_seq``, with ``extra``."""
    properties = {str(k): str(v) for k, v in (extra or {}).items()}
    if stream_created is not None:
        properties.setdefault(STREAM_CREATED_KEY, stream_created)
    properties[PIPELINE_KEY] = app_id
    properties[LAST_SEQ_KEY] = str(last_seq)
    return properties
