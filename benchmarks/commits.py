"""What a small Delta commit costs over a long run: the service's steady state, one pipeline.

A service run commits every caught-up pipeline about once a poll, a few rows at a time, for an
hour; a per-tick run commits once or twice. This times that commit alone (the sink's
``prepare`` and ``commit``, maintenance included) for ``--commits`` commits of ``--rows`` orders
each into a fresh local table, in this one process, per setting:

- ``before``: every commit through deltalake, with Delta's 30-day log retention, as every
  table had three stops ago (compaction every 100 versions, a checkpoint every 10);
- ``deltalake``: every commit through deltalake, with the log retention scaled to this
  benchmark's pace (``--bounded-seconds``, 20 s: about 900 commits, as 15 minutes are at a
  commit a second), as of two stops ago;
- ``direct``: appends written directly (``sink/delta_append.py``), the same scaled retention,
  still a checkpoint every 10 versions, as of the last stop;
- ``now``: today's defaults (a local table checkpoints every 100 versions), the same scaled
  retention.

It reports CPU milliseconds per commit over consecutive windows of ``--window`` commits and the
log entries left at the end.

    .venv/bin/python -m benchmarks.commits                 # 3,000 commits of 5 orders each
    .venv/bin/python -m benchmarks.commits --commits 600 --settings direct,now
"""

import argparse
import contextlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.workload import order
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import delta, delta_append

SETTINGS: dict[str, dict[str, object]] = {
    "before": {"log_retention_hours": 30 * 24, "checkpoint_every": 10},
    "deltalake": {"checkpoint_every": 10},  # log_retention_hours from --bounded-seconds
    "direct": {"checkpoint_every": 10},  # the same
    "now": {},  # the same
}
"""Sink options per setting (the others are the sink's defaults)."""
THROUGH_DELTALAKE = {"before", "deltalake"}
"""Settings whose appends all go through deltalake, as before direct appends."""


@contextlib.contextmanager
def appends_through_deltalake(enabled: bool):  # type: ignore[no-untyped-def]
    """Within it, the Delta sink treats every table as one direct appends may not write."""
    allowed = delta_append.direct_appends_allowed
    if enabled:
        delta_append.direct_appends_allowed = lambda table, *, local: False  # type: ignore[assignment]
    try:
        yield
    finally:
        delta_append.direct_appends_allowed = allowed


def cpu_seconds() -> float:
    """CPU time of this process, every thread (deltalake's own included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def orders_batch(first_seq: int, rows: int) -> MessageBatch:
    """``rows`` orders from stream sequence ``first_seq``, stamped now."""
    now_ns = time.time_ns()
    return MessageBatch(
        sequences=list(range(first_seq, first_seq + rows)),
        timestamps_ns=[now_ns] * rows,
        subjects=["orders.created"] * rows,
        payloads=[order(seq) for seq in range(first_seq, first_seq + rows)],
    )


def run(
    setting: str, options: dict[str, object], commits: int, rows: int, folder: Path
) -> tuple[list[float], int, int]:
    """Commit ``commits`` small batches; CPU seconds per commit, log entries and rows left."""
    sink = delta.DeltaSink(TableLocation(str(folder / setting)), app_id="bench", **options)
    sink.open()
    costs: list[float] = []
    seq = 1
    for _ in range(commits):
        started = cpu_seconds()
        prepared = sink.prepare(orders_batch(seq, rows))
        sink.commit(prepared.rows, prepared.dead_letters, last_seq=seq + rows - 1)
        costs.append(cpu_seconds() - started)
        seq += rows
    log = list((folder / setting / "_delta_log").glob("*.json"))
    return costs, len(log), sink.row_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.commits", description=__doc__)
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=5, help="orders per commit")
    parser.add_argument("--window", type=int, default=500, help="commits per column")
    parser.add_argument("--settings", default="before,deltalake,direct,now")
    parser.add_argument("--bounded-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    windows = range(0, args.commits, args.window)
    print(f"{args.commits} commits of {args.rows} orders each: CPU ms per commit, by commits")
    print(
        "| settings | "
        + " | ".join(f"{w + 1}-{min(w + args.window, args.commits)}" for w in windows)
        + " | all | log entries left |"
    )
    print("|---|" + "---:|" * (len(windows) + 2))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="nilus-commits-") as folder:
        for setting in args.settings.split(","):
            options = dict(SETTINGS[setting])
            if setting != "before":
                options["log_retention_hours"] = args.bounded_seconds / 3600
            with appends_through_deltalake(setting in THROUGH_DELTALAKE):
                costs, entries, rows = run(setting, options, args.commits, args.rows, Path(folder))
            means = [1000 * statistics.mean(costs[w : w + args.window]) for w in windows]
            print(
                f"| {setting} | "
                + " | ".join(f"{m:.1f}" for m in means)
                + f" | {1000 * statistics.mean(costs):.1f} | {entries:,} |",
                flush=True,
            )
            if rows != args.commits * args.rows:
                print(f"{setting}: {rows} rows, expected {args.commits * args.rows}")
                failed = 1
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
