"""Keeping a Delta table of a long-running pipeline cheap to write and read.

Measured on deltalake 1.6.6 with small commits (a few rows each, as a service run makes them):
a commit costs about 6 ms of CPU on a fresh table, plus about 0.17 ms for every small file in
the snapshot (compaction resets that) and, on a local file system, about 12 us for every entry
in ``_delta_log`` (each commit lists the whole folder; object stores list from the current
version). Without log cleanup a pipeline committing every second would pay about 1 s a commit
after a day. Hence compaction counted in table versions (so runs of a commit or two compact
too), and a short log retention for local tables, cleaned every ``LOG_CLEANUP_EVERY`` versions
(Delta's own cleanup runs only after deltalake's commits, and direct appends bypass it).

Compaction and checkpoints are optimisations: a failure is logged and skipped, never fails the
commit that ran it.
"""

import logging
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError

from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.manifest.model import LOCAL_LOG_RETENTION_HOURS
from nilus_dagster.redaction import redact
from nilus_dagster.sink.delta_append import local_path, remove_abandoned_entries
from nilus_dagster.sink.writer import error_text

logger = logging.getLogger("nilus_dagster.sink")

LOG_RETENTION_PROPERTY = "delta.logRetentionDuration"
FILE_RETENTION_PROPERTY = "delta.deletedFileRetentionDuration"
MIN_FILE_RETENTION_HOURS = 1.0
VACUUM_EVERY = 1000
"""Table versions between vacuums of a local table (files compacted away, past retention)."""
LOG_CLEANUP_EVERY = 100
"""Table versions between removals of log entries past the retention (Delta's own interval)."""
CHECKPOINT_INTERVAL_PROPERTY = "delta.checkpointInterval"
DELTA_CHECKPOINT_INTERVAL = 100
"""deltalake's checkpoint interval for a table that does not set the property."""


def table_configuration(
    location: TableLocation, log_retention_hours: float | None
) -> dict[str, str] | None:
    """The table properties a table the sink creates starts with (``None``: Delta's defaults).

    The log retention, and the retention of removed files, which is at least an hour: it
    decides how long a compacted-away file's removal stays in every checkpoint (Delta's
    default, a week, is 600,000 removals for a pipeline committing every second) and how old
    an unreferenced file must be before vacuum deletes it (a file being committed is new).

    Args:
        location: Where the table is created (local tables get a short log retention).
        log_retention_hours: The manifest's ``log_retention_hours``; ``None`` for the default.
    """
    hours = log_retention_hours
    if hours is None and location.is_local:
        hours = LOCAL_LOG_RETENTION_HOURS
    if hours is None:
        return None
    return {
        LOG_RETENTION_PROPERTY: _interval(hours),
        FILE_RETENTION_PROPERTY: _interval(max(hours, MIN_FILE_RETENTION_HOURS)),
    }


def checkpoint_interval(table: DeltaTable) -> int:
    """The table's own checkpoint interval: ``delta.checkpointInterval``, else deltalake's."""
    value = table.metadata().configuration.get(CHECKPOINT_INTERVAL_PROPERTY)
    try:
        return max(1, int(value)) if value else DELTA_CHECKPOINT_INTERVAL
    except ValueError:
        return DELTA_CHECKPOINT_INTERVAL


def _interval(hours: float) -> str:
    return f"interval {max(1, round(hours * 3600))} seconds"


def bound_log_retention(
    table: DeltaTable,
    location: TableLocation,
    log_retention_hours: float | None,
    metadata: Mapping[str, str],
) -> None:
    """Give an existing table the retentions a table the sink creates would get.

    Tables created before the sink set them keep Delta's defaults, and on a local file system
    their commits and checkpoints slow down without bound. A retention someone set on the
    table is kept unless the manifest sets ``log_retention_hours``.

    Args:
        table: The table about to be written.
        location: Where it is.
        log_retention_hours: The manifest's ``log_retention_hours``; ``None`` for the default.
        metadata: ``commitInfo`` entries the properties' commit carries.
    """
    wanted = table_configuration(location, log_retention_hours)
    if wanted is None:
        return
    current = table.metadata().configuration
    missing = {
        key: value
        for key, value in wanted.items()
        if current.get(key) != value and (current.get(key) is None or log_retention_hours)
    }
    if not missing:
        return
    try:
        table.alter.set_table_properties(
            missing, commit_properties=CommitProperties(custom_metadata=dict(metadata) or None)
        )
    except (CommitFailedError, DeltaError) as exc:
        # An optimisation too; the next run tries again.
        logger.warning("%s: log retention not set: %s", redact(location.uri), error_text(exc))


def maintenance_due(
    location: TableLocation, version: int, compact_every: int, checkpoint_every: int
) -> bool:
    """Whether the commit that made ``version`` leaves work for maintenance."""
    return any(
        due(location, version, every)
        for every in (compact_every, checkpoint_every, LOG_CLEANUP_EVERY, VACUUM_EVERY)
    )


def due(location: TableLocation, version: int, every: int) -> bool:
    """Whether ``version`` is the table's turn for work done every ``every`` versions (0: never).

    Turns go by the version a commit made, which has exactly one writer: writers sharing a
    table take turns (counted from each one's own earlier version, several compacted at once,
    and deltalake 1.6.6 lets two compactions of the same files both commit, doubling rows).
    Each table's turns are shifted by a number drawn from its URI: a fleet's pipelines start
    together and commit at the same pace, and would otherwise all compact (or checkpoint) in
    the same few seconds, each time.
    """
    return every > 0 and (version + zlib.crc32(location.uri.encode())) % every == 0


COMPACTION_LOCK = "_nilus_compaction.lock"
"""A local table's compaction in progress (underscored: Delta readers and vacuum skip it)."""
STALE_LOCK_SECONDS = 600.0
"""A lock older than this was left by a killed writer: compactions take well under a second."""
ABANDONED_ENTRY_SECONDS = 3600.0


@contextmanager
def compaction_turn(location: TableLocation) -> Iterator[bool]:
    """Whether this writer may compact now; on a local table, held exclusively until exit.

    Taking turns by version leaves one case open: a compaction so slow that the next turn's
    writer starts another over the same files, which deltalake 1.6.6 would let commit too. A
    lock file created only if absent closes it where the table is local.
    """
    if not location.is_local:
        yield True
        return
    lock = local_path(location.uri) / COMPACTION_LOCK
    taken = _create_lock(lock)
    try:
        yield taken
    finally:
        if taken:
            lock.unlink(missing_ok=True)


def _create_lock(lock: Path) -> bool:
    """Create ``lock`` if absent, replacing one a killed writer left; whether it was created."""
    for _ in range(2):
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime < STALE_LOCK_SECONDS:
                    return False
                lock.unlink()
            except FileNotFoundError:
                pass  # released meanwhile: try again
    return False


def maintain_table(
    table: DeltaTable,
    location: TableLocation,
    *,
    version: int,
    compact_every: int,
    checkpoint_every: int,
    metadata: Mapping[str, str],
) -> None:
    """Compact, checkpoint, clean the log of and vacuum ``table``, each at its interval.

    Args:
        table: The snapshot just committed through.
        location: Where the table is (its URI is redacted before it is logged).
        version: The version the commit made.
        compact_every: Compact every this many table versions (0 disables).
        checkpoint_every: Checkpoint every this many table versions (0: Delta's own only).
        metadata: ``commitInfo`` entries the compaction commit carries.
    """
    uri = location.uri
    if due(location, version, compact_every):
        with compaction_turn(location) as mine:
            try:
                if mine:
                    # Read the table under the lock: a compaction that ran since the snapshot
                    # was taken has replaced the files this one would rewrite.
                    table.update_incremental()
                    table.optimize.compact(
                        commit_properties=CommitProperties(custom_metadata=dict(metadata) or None)
                    )
            except (CommitFailedError, DeltaError) as exc:
                # Compaction is an optimisation; a concurrent merge or overwrite wins.
                logger.warning("%s: compaction skipped: %s", redact(uri), error_text(exc))
    if due(location, version, checkpoint_every):
        try:
            table.create_checkpoint()
        except DeltaError as exc:
            logger.warning("%s: checkpoint skipped: %s", redact(uri), error_text(exc))
    if due(location, version, LOG_CLEANUP_EVERY):
        try:
            table.cleanup_metadata()
        except DeltaError as exc:
            logger.warning("%s: log cleanup skipped: %s", redact(uri), error_text(exc))
        if location.is_local:
            remove_abandoned_entries(local_path(uri), ABANDONED_ENTRY_SECONDS)
    if location.is_local and due(location, version, VACUUM_EVERY):
        # Without it every small file stays on disk after compaction, and so does each
        # rewrite of the compacted file. Local tables only: on object stores the sink keeps
        # Delta's retentions and leaves vacuum to their owners.
        try:
            table.vacuum(dry_run=False, full=True)
        except (CommitFailedError, DeltaError) as exc:
            logger.warning("%s: vacuum skipped: %s", redact(uri), error_text(exc))
