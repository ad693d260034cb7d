"""The NATS server killed (SIGKILL) and restarted, or stopped (SIGSTOP), while a run pulls.

Each test has a server of its own (store and port kept across a kill), runs the engine in a
thread, injects the fault while the run is between its first and last commit, and ends with
the checker. A run must either finish correctly after the server comes back, or fail with a
clean :class:`SourceError` within its bound; a re-run then completes exactly once.
"""

import logging
import random
import threading
import time
from pathlib import Path

import pytest
from checker import check_exactly_once, consumer_state
from conftest import Publisher, order

from nilus_dagster.engine import run_pipeline
from nilus_dagster.engine.report import RunReport
from nilus_dagster.errors import SourceError
from nilus_dagster.manifest import parse_pipeline

STREAM = "FAULTS"
SUBJECT = "faults.orders"
DURABLE = "nilus_faults"


class _Run(threading.Thread):
    """One engine run in a thread: its report or its exception, and how long it took."""

    def __init__(self, pipeline, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.pipeline = pipeline
        self.kwargs = kwargs
        self.report: RunReport | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        began = time.monotonic()
        try:
            self.report = run_pipeline(self.pipeline, **self.kwargs)
        except BaseException as exc:  # asserted by the test
            self.error = exc
        self.seconds = time.monotonic() - began


def _commits(table: Path) -> int:
    log = table / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


def _wait_for_commit(table: Path, run: _Run, after: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.is_alive():
        if _commits(table) > after:
            return True
        time.sleep(0.002)
    return False


def _setup(nats_server_factory, write_manifest, count: int, query: str = ""):  # type: ignore[no-untyped-def]
    server = nats_server_factory()
    publisher = Publisher(server.url)
    publisher.create_stream(STREAM, ["faults.>"])
    published = publisher.publish_orders(SUBJECT, count)
    path = write_manifest(
        address=f"nats+jetstream://{server.hostport}?subject={SUBJECT}&batch_size=250{query}",
        stream=STREAM,
        extra_sink_options="commit_max_rows: 500\ncheckpoint_every: 0\ncompact_every: 0\n",
    )
    pipeline = parse_pipeline(path)
    return server, published, pipeline, Path(pipeline.table_location().uri)


def _check(report_uri: str, published: list[int], app_id: str) -> None:
    result = check_exactly_once(
        report_uri,
        published,
        app_id,
        keys={seq: order(i)["order_id"] for i, seq in enumerate(published)},
        key_column="order_id",
    )
    assert result.ok, str(result)


@pytest.mark.parametrize("query", ["", f"&durable={DURABLE}&ack_policy=all"])
def test_server_killed_and_restarted_mid_run(nats_server_factory, write_manifest, query, caplog):
    caplog.set_level(logging.WARNING, logger="nilus_dagster")
    server, published, pipeline, table = _setup(nats_server_factory, write_manifest, 40_000, query)
    rng = random.Random(11)
    run = _Run(pipeline, drain=True)
    run.start()

    kills = 0
    for _ in range(3):
        if not _wait_for_commit(table, run, _commits(table)):
            break
        time.sleep(rng.uniform(0, 0.05))
        server.kill()
        kills += 1
        time.sleep(rng.uniform(0.2, 1.0))  # down: the run retries its connection meanwhile
        server.start()
    run.join(60)

    assert kills >= 2, "the run finished before the server could be killed twice; publish more"
    assert run.error is None, repr(run.error)
    assert run.report is not None and run.report.position == published[-1]
    assert any("resuming after sequence" in r.getMessage() for r in caplog.records)
    _check(run.report.table_uri, published, pipeline.app_id)
    if query:
        # The acks after each commit reached the restarted server: both sides agree.
        assert consumer_state(server.url, STREAM, DURABLE)["ack_floor"] == published[-1]


@pytest.mark.parametrize("pause", [3.0, 13.0])
def test_server_stopped_during_a_pull_then_resumed(
    nats_server_factory, write_manifest, pause, caplog
):
    caplog.set_level(logging.WARNING, logger="nilus_dagster")
    server, published, pipeline, table = _setup(nats_server_factory, write_manifest, 30_000)
    run = _Run(pipeline, drain=True)
    run.start()

    assert _wait_for_commit(table, run, 1), "the run finished before its first commit"
    # Connections stay open and nothing answers: pulls hang and heartbeats stop. 3 s is within
    # a pull's patience; 13 s is past the heartbeat silence bound (11 s), so the source drops
    # the consumer and recovers while the server is still stopped.
    server.pause()
    time.sleep(pause)
    paused_alive = run.is_alive()
    server.resume()
    run.join(60)

    assert paused_alive, "the run finished during the pause; publish more"
    recovered = [r for r in caplog.records if "resuming after sequence" in r.getMessage()]
    assert bool(recovered) == (pause > 11), [r.getMessage() for r in recovered]
    if run.error is not None:
        # Allowed: a clean failure within the bound, then a re-run finishes the job.
        assert isinstance(run.error, SourceError), repr(run.error)
        report = run_pipeline(pipeline, drain=True)
    else:
        report = run.report
    assert report is not None and report.position == published[-1]
    _check(report.table_uri, published, pipeline.app_id)


def test_run_against_a_stopped_server_fails_cleanly_within_its_bound(
    nats_server_factory, write_manifest
):
    server, published, pipeline, _ = _setup(nats_server_factory, write_manifest, 500)
    server.pause()
    try:
        run = _Run(pipeline, drain=True)
        run.start()
        run.join(60)
    finally:
        server.resume()

    assert isinstance(run.error, SourceError), repr(run.error)
    assert run.seconds < 15, f"took {run.seconds:.1f}s to give up"
    assert server.hostport in str(run.error)
    report = run_pipeline(pipeline, drain=True)
    _check(report.table_uri, published, pipeline.app_id)


def test_server_gone_for_good_mid_run_fails_cleanly_within_its_bound(
    nats_server_factory, write_manifest, monkeypatch
):
    # The bound is failover_timeout (30 s by default); a short one keeps the suite fast.
    monkeypatch.setenv("NILUS_NATS_FAILOVER_TIMEOUT", "5")
    server, published, pipeline, table = _setup(nats_server_factory, write_manifest, 40_000)
    run = _Run(pipeline, drain=True)
    run.start()
    assert _wait_for_commit(table, run, 1), "the run finished before its first commit"
    server.kill()
    killed_at = time.monotonic()
    run.join(90)
    gave_up_after = time.monotonic() - killed_at

    assert isinstance(run.error, SourceError), repr(run.error)
    assert "could not resume pulling" in str(run.error), str(run.error)
    # failover_timeout plus a last attempt, never a hang.
    assert gave_up_after < 20, f"gave up after {gave_up_after:.1f}s"
    # What was committed before the loss is intact and consistent.
    partial = check_exactly_once(str(table), published, pipeline.app_id)
    assert not (partial.duplicated or partial.unexpected) and partial.position_matches, partial
    server.start()
    report = run_pipeline(pipeline, drain=True)
    _check(report.table_uri, published, pipeline.app_id)
