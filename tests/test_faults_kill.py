"""The run killed (SIGKILL) at precise points of a commit, and while creating the table.

``test_engine_kill.py`` kills at random moments. These tests watch the table folders and kill
the moment a step of the commit protocol becomes visible: the data file written but not yet in
the log, the dead letters committed but not the rows, the rows committed but not yet acked, and
the very first commit while it creates the tables. Each kill is followed by the next run; the
checker then sees every sequence exactly once, and a durable consumer's ack floor ends equal to
the table's position.
"""

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from checker import DEAD_LETTER_SUFFIX, check_exactly_once, consumer_state
from conftest import order, start_cli_run
from deltalake import DeltaTable

from nilus_dagster.engine import run_pipeline
from nilus_dagster.manifest import parse_pipeline

POISON_EVERY = 97


def _payloads(count: int, start: int = 0) -> list[bytes | dict[str, object]]:
    return [
        b"poison %d" % i if i % POISON_EVERY == 5 else order(i) for i in range(start, start + count)
    ]


def _commits(table: Path) -> int:
    log = table / "_delta_log"
    try:
        return sum(1 for name in os.listdir(log) if name.endswith(".json"))
    except FileNotFoundError:
        return 0


def _data_files(table: Path) -> int:
    try:
        return sum(1 for name in os.listdir(table) if name.endswith(".parquet"))
    except FileNotFoundError:
        return 0


def _unreferenced(table: Path) -> int:
    """Data files no commit references (with compaction and checkpoints off, every commit after
    the table's empty creation adds exactly one file)."""
    return _data_files(table) - max(_commits(table) - 1, 0)


def _position(table: Path, app_id: str) -> int:
    try:
        return DeltaTable(str(table)).transaction_version(app_id) or 0
    except Exception:  # no table (yet)
        return 0


def _kill_when(
    process: subprocess.Popen[str],
    event: Callable[[], bool],
    *,
    delay: float = 0.0,
    timeout: float = 30.0,
) -> bool:
    """SIGKILL ``process`` ``delay`` s after ``event()`` is true; False if it ended first."""
    deadline = time.monotonic() + timeout
    fired = False
    while time.monotonic() < deadline and process.poll() is None:
        if event():
            fired = True
            break
    if fired and delay:
        time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    return fired


def _manifest(write_manifest, server, stream, subject, *, dest="analytics.orders", query=""):
    return write_manifest(
        address=f"nats+jetstream://{server.hostport}?subject={subject}&batch_size=250{query}",
        stream=stream,
        dest_table=dest,
        extra_sink_options="commit_max_rows: 500\ncheckpoint_every: 0\ncompact_every: 0\n",
    )


@pytest.mark.parametrize("consumer", ["ephemeral", "durable-ack-all"])
def test_sigkill_between_the_steps_of_a_commit(
    nats_server, publisher, stream_name, write_manifest, consumer
):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    published = publisher.publish(subject, _payloads(30_000))
    poison = [s for i, s in enumerate(published) if i % POISON_EVERY == 5]
    query = "&durable=nilus_kill&ack_policy=all" if consumer != "ephemeral" else ""
    path = _manifest(write_manifest, nats_server, stream_name, subject, query=query)
    pipeline = parse_pipeline(path)
    table = Path(pipeline.table_location().uri)
    dead = Path(str(table) + DEAD_LETTER_SUFFIX)

    landed = {"data-written": 0, "dead-letters-committed": 0, "committed": 0}
    for attempt in range(30):
        pending = [name for name, count in landed.items() if not count]
        if not pending:
            break
        step = pending[attempt % len(pending)]
        commits, orphans, dead_commits = _commits(table), _unreferenced(table), _commits(dead)
        events = {
            # A new data file is complete but no commit references it yet.
            "data-written": lambda n=orphans: _unreferenced(table) > n,
            # The dead letters' commit landed; the rows' commit comes next.
            "dead-letters-committed": lambda n=dead_commits: _commits(dead) > n,
            # The rows' commit landed; the ack (durable) or the next pull comes next.
            "committed": lambda n=commits: _commits(table) > n,
        }
        before = _position(table, pipeline.app_id)
        if not _kill_when(start_cli_run(path), events[step]):
            pytest.fail(f"the run finished before {step} was seen; publish more")
        after = _position(table, pipeline.app_id)
        if step == "data-written":
            # Proof the kill fell inside the window: one more file that no commit references.
            landed[step] += _unreferenced(table) > orphans and after == before
        elif step == "dead-letters-committed":
            landed[step] += _position(dead, pipeline.app_id) > after
        else:
            landed[step] += after > before

    assert all(landed.values()), f"kills did not land in every window: {landed}"
    report = run_pipeline(pipeline, drain=True)
    result = check_exactly_once(
        report.table_uri,
        published,
        pipeline.app_id,
        expect_dead=poison,
        keys={s: order(i)["order_id"] for i, s in enumerate(published) if s not in poison},
        key_column="order_id",
    )
    assert result.ok, str(result)
    if consumer != "ephemeral":
        state = consumer_state(nats_server.url, stream_name, "nilus_kill")
        assert state["ack_floor"] == report.position == published[-1], state


def test_sigkill_while_the_first_commit_creates_the_tables(
    nats_server, publisher, stream_name, write_manifest
):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    published = publisher.publish(subject, _payloads(2_000))
    poison = [s for i, s in enumerate(published) if i % POISON_EVERY == 5]
    path = _manifest(write_manifest, nats_server, stream_name, subject)
    pipeline = parse_pipeline(path)
    table = Path(pipeline.table_location().uri)
    dead = Path(str(table) + DEAD_LETTER_SUFFIX)

    seen: list[str] = []
    # The last two only on a loaded machine, where the first commit's steps take longer.
    for delay in (0, 0, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06, 0.12, 0.25):
        if delay > 0.06 and len(set(seen)) >= 3:
            break
        shutil.rmtree(table, ignore_errors=True)
        shutil.rmtree(dead, ignore_errors=True)
        process = start_cli_run(path)
        # The dead letters of the first chunk create their table first, then the rows'.
        if not _kill_when(process, lambda: dead.exists() or table.exists(), delay=delay):
            pytest.fail("the run ended before it created a table")
        seen.append(
            f"dead={_commits(dead)}/{_position(dead, pipeline.app_id)} "
            f"rows={_commits(table)}/{_position(table, pipeline.app_id)}"
        )

        report = run_pipeline(pipeline, drain=True)

        result = check_exactly_once(
            report.table_uri, published, pipeline.app_id, expect_dead=poison
        )
        assert result.ok, f"after a kill leaving {seen[-1]}: {result}"
    # The kills must have landed in different steps of the first commit, not all before it.
    assert len(set(seen)) >= 3, seen
