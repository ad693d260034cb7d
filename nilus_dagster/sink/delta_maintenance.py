"""Keeping a Delta table of a long-running pipeline cheap to read: compaction and checkpoints.

Both are optimisations: a failure is logged and skipped, never fails the commit that ran it.
"""

import logging
from collections.abc import Mapping

from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError

from nilus_dagster.redaction import redact
from nilus_dagster.sink.writer import error_text

logger = logging.getLogger("nilus_dagster.sink")


def maintain_table(
    table: DeltaTable,
    uri: str,
    *,
    commits: int,
    compact_every: int,
    checkpoint_every: int,
    metadata: Mapping[str, str],
) -> None:
    """Compact and checkpoint ``table`` when ``commits`` reaches a multiple of their interval.

    Args:
        table: The snapshot just committed through.
        uri: The table's URI (redacted before it is logged).
        commits: Commits made by this writer so far.
        compact_every: Compact every this many commits (0 disables).
        checkpoint_every: Checkpoint every this many commits (0 disables).
        metadata: ``commitInfo`` entries the compaction commit carries.
    """
    if compact_every and commits % compact_every == 0:
        try:
            table.optimize.compact(
                commit_properties=CommitProperties(custom_metadata=dict(metadata) or None)
            )
        except (CommitFailedError, DeltaError) as exc:
            # Compaction is an optimisation; a concurrent merge or overwrite wins.
            logger.warning("%s: compaction skipped: %s", redact(uri), error_text(exc))
    if checkpoint_every and commits % checkpoint_every == 0:
        try:
            table.create_checkpoint()
        except DeltaError as exc:
            logger.warning("%s: checkpoint skipped: %s", redact(uri), error_text(exc))
