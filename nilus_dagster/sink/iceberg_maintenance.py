"""Keeping an Iceberg table of a long-running pipeline small: compaction and snapshot expiry.

Each commit of a stream adds a data file and a snapshot. Compaction rewrites a run of small
files, adjacent in stream sequence, into one file with the same rows; expiry drops old
snapshots from the metadata and deletes the files only they referenced, so neither the
metadata nor the storage grows without bound. pyiceberg (0.12) has neither operation for data
files, so both are built here from its public scan, overwrite and expire APIs.
"""

import logging
from collections.abc import Iterable, Mapping

import pyarrow as pa
from pyiceberg.conversions import from_bytes
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThanOrEqual
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot, ancestors_of
from pyiceberg.types import LongType

from nilus_dagster.errors import SinkError
from nilus_dagster.sink import iceberg_catalog as cat
from nilus_dagster.sink.iceberg_position import PIPELINE_KEY

logger = logging.getLogger("nilus_dagster.sink")

SMALL_FILE_BYTES = 32 * 1024 * 1024
"""Data files under this size are compacted."""
MAX_COMPACT_BYTES = 256 * 1024 * 1024
"""At most this much data (on disk) is rewritten by one compaction."""

# What a maintenance step can fail with and be skipped for: a concurrent commit, or what a
# failed write raises (object stores surface as OSError).
_SKIPPED_ERRORS = (CommitFailedException, OSError, ValueError, pa.ArrowException, SinkError)


def maintain_table(
    table: Table,
    dead: Table | None,
    name: str,
    *,
    commits: int,
    compact_every: int,
    expire_every: int,
    keep_snapshots: int,
    properties: Mapping[str, str],
) -> bool:
    """Compact ``table`` and expire snapshots of it and ``dead`` when their interval is due.

    Both are optimisations: a failure is logged and skipped.

    Args:
        table: The sink's table, as committed through.
        dead: Its dead-letter table, when there is one.
        name: The table's name, for the log.
        commits: Commits made by this writer so far.
        compact_every: Compact every this many commits (0 disables).
        expire_every: Expire snapshots every this many commits (0 disables).
        keep_snapshots: Snapshots an expiry keeps.
        properties: The snapshot summary a compaction commit carries (the position, unchanged).

    Returns:
        Whether snapshots were expired: expiry asserts nothing about the branch, so it may
        have taken in another writer's commit, and the caller re-reads the position.
    """
    if compact_every and commits % compact_every == 0:
        try:
            compact_small_files(table, dict(properties))
        except _SKIPPED_ERRORS as exc:
            # Compaction is an optimisation; a concurrent commit wins.
            logger.warning("%s: compaction skipped: %s", name, cat.error_text(exc))
    if not (expire_every and commits % expire_every == 0):
        return False
    for target in (table, dead):
        if target is None:
            continue
        try:
            expire_snapshots(target, keep_snapshots, PIPELINE_KEY)
        except _SKIPPED_ERRORS as exc:
            logger.warning("%s: snapshot expiry skipped: %s", name, cat.error_text(exc))
    return True


def compact_small_files(table: Table, snapshot_properties: dict[str, str]) -> int:
    """Rewrite the longest run of small data files adjacent in ``_nats_seq`` into one.

    The run's rows are those with ``_nats_seq`` between the run's bounds; no other file holds
    a sequence in that range (checked from the files' column bounds), so an overwrite by that
    range replaces exactly the run's files with the same rows. The commit carries
    ``snapshot_properties`` (the position, unchanged) and asserts the branch head like any
    commit, so it fails rather than overwrite a concurrent writer's rows.

    Returns:
        How many files were rewritten (0: nothing to do).
    """
    if table.current_snapshot() is None:
        return 0
    seq_id = table.schema().find_field("_nats_seq").field_id
    files = []
    for task in table.scan().plan_files():
        lower = (task.file.lower_bounds or {}).get(seq_id)
        upper = (task.file.upper_bounds or {}).get(seq_id)
        if lower is None or upper is None or task.delete_files:
            return 0  # without bounds no range is known to be exclusive
        files.append(
            (
                from_bytes(LongType(), lower),
                from_bytes(LongType(), upper),
                task.file.file_size_in_bytes,
            )
        )
    files.sort()
    runs: list[list[tuple[int, int, int]]] = [[]]
    reach = -1  # the highest sequence of the files before the current one
    for low, high, size in files:
        run = runs[-1]
        if low <= reach:
            # Overlaps an earlier file: no range around it is exclusive to a run.
            run.clear()
            runs.append([])
        elif size >= SMALL_FILE_BYTES:
            runs.append([])
        elif sum(f[2] for f in run) + size > MAX_COMPACT_BYTES:
            runs.append([(low, high, size)])
        else:
            run.append((low, high, size))
        reach = max(reach, high)
    best = max(runs, key=len)
    if len(best) < 2:
        return 0
    seq_range = And(
        GreaterThanOrEqual("_nats_seq", best[0][0]), LessThanOrEqual("_nats_seq", best[-1][1])
    )
    rows = table.scan(row_filter=seq_range).to_arrow()
    with table.transaction() as txn:
        txn.overwrite(rows, seq_range, snapshot_properties=snapshot_properties)
    logger.info("%s: compacted %d small files", ".".join(table.name()), len(best))
    return len(best)


def expire_snapshots(table: Table, keep: int, pipeline_key: str) -> int:
    """Expire all but the newest ``keep`` snapshots of the branch, and delete their files.

    The newest snapshot of every pipeline found in the ancestry is kept, with everything after
    it, because a pipeline's position is read from there. Files referenced only by expired
    snapshots (manifest lists, manifests, data files) are deleted.

    Returns:
        How many snapshots were expired.
    """
    ancestry = list(ancestors_of(table.current_snapshot(), table.metadata))
    if len(ancestry) <= keep:
        return 0
    newest_of: dict[str, int] = {}
    for index, snapshot in enumerate(ancestry):
        owner = snapshot.summary[pipeline_key] if snapshot.summary is not None else None
        if owner is not None:
            newest_of.setdefault(owner, index)
    cut = max(keep, *(i + 1 for i in newest_of.values()))
    retained = {s.snapshot_id for s in ancestry[:cut]}
    expired = [s for s in table.snapshots() if s.snapshot_id not in retained]
    if not expired:
        return 0
    live_manifests, live_files = _reachable(
        table, [s for s in table.snapshots() if s.snapshot_id in retained]
    )
    dead_manifests, dead_files = _reachable(table, expired)
    table.maintenance.expire_snapshots().by_ids([s.snapshot_id for s in expired]).commit()
    # Only after the commit: a failed expiry must not have deleted anything still referenced.
    garbage = [s.manifest_list for s in expired]
    garbage += sorted(dead_manifests - live_manifests)
    garbage += sorted(dead_files - live_files)
    _delete(table, garbage)
    return len(expired)


def _reachable(table: Table, snapshots: Iterable[Snapshot]) -> tuple[set[str], set[str]]:
    manifests: dict[str, object] = {}
    for snapshot in snapshots:
        for manifest in snapshot.manifests(table.io):
            manifests.setdefault(manifest.manifest_path, manifest)
    files: set[str] = set()
    for manifest in manifests.values():
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):  # type: ignore[attr-defined]
            files.add(entry.data_file.file_path)
    return set(manifests), files


def _delete(table: Table, paths: list[str]) -> None:
    for path in paths:
        try:
            table.io.delete(path)
        except OSError as exc:  # an orphan file costs storage, never correctness
            logger.warning("could not delete %s: %s", path, exc)
