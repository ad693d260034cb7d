"""A run against a three-node JetStream cluster and an R3 stream, while nodes fail.

Each test publishes to an R3 stream, starts a drain in a thread with an address that lists all
three servers, and injects one cluster fault after the run's first commit: the stream leader
SIGKILLed and restarted, the node the run is connected to SIGKILLed and restarted, every node
stopped and started in turn, the leader SIGSTOPped for 20 s. The run must succeed, and the
checker must find every sequence once and the position at the last one.
"""

import asyncio
import logging
import threading
import time
from pathlib import Path

import nats
import pytest
from checker import check_exactly_once
from conftest import Publisher, order

from nilus_dagster.engine import run_pipeline
from nilus_dagster.engine.report import RunReport
from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream.local_cluster import LocalNatsCluster
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest import parse_pipeline

# Small pulls and commits keep the run busy for seconds, so the faults land in the middle of it.
QUERY = "&batch_size=100&timeout=5"
SINK_OPTIONS = "commit_max_rows: 200\ncheckpoint_every: 0\ncompact_every: 0\n"


class _Run(threading.Thread):
    """One engine run in a thread: its report or its exception."""

    def __init__(self, pipeline, pace: float = 0.0):  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.pipeline = pipeline
        self.pace = pace
        self.report: RunReport | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        def slow_down(_: object) -> None:
            # After each commit: a run that lasts however fast the machine is.
            time.sleep(self.pace)

        try:
            self.report = run_pipeline(
                self.pipeline, drain=True, on_progress=slow_down if self.pace else None
            )
        except BaseException as exc:  # asserted by the test
            self.error = exc


def _leader(cluster: LocalNatsCluster, stream: str) -> LocalNatsServer:
    async def ask() -> str:
        nc = await nats.connect(cluster.urls, connect_timeout=2, max_reconnect_attempts=1)
        try:
            return str((await nc.jetstream().stream_info(stream)).cluster.leader)
        finally:
            await nc.close()

    return cluster.node(asyncio.run(ask()))


def _commits(table: Path) -> int:
    log = table / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


def _start(nats_cluster, stream, write_manifest, count, pick, pace=0.0):  # type: ignore[no-untyped-def]
    """Publish ``count`` orders to a new R3 stream and start a drain; returns once it has
    committed. Its address lists ``pick(stream leader)`` first: the node it connects to."""
    subject = f"{stream}.orders"
    publisher = Publisher(nats_cluster.urls)  # type: ignore[arg-type]
    publisher.create_stream(stream, [f"{stream}.>"], num_replicas=3)
    published = publisher.publish_orders(subject, count)
    first = pick(_leader(nats_cluster, stream))
    hosts = [first.hostport] + [h for h in nats_cluster.hostports if h != first.hostport]
    path = write_manifest(
        address=f"nats+jetstream://{','.join(hosts)}?subject={subject}{QUERY}",
        stream=stream,
        extra_sink_options=SINK_OPTIONS,
    )
    pipeline = parse_pipeline(path)
    table = Path(pipeline.table_location().uri)
    run = _Run(pipeline, pace)
    run.start()
    deadline = time.monotonic() + 30
    while _commits(table) < 2 and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert run.is_alive(), f"the run ended before the fault: {run.error!r}; publish more"
    return run, published, pipeline, first


def _finish(run: _Run, published: list[int], pipeline) -> RunReport:  # type: ignore[no-untyped-def]
    run.join(120)
    assert not run.is_alive(), "the run hangs"
    assert run.error is None, repr(run.error)
    assert run.report is not None and run.report.position == published[-1]
    result = check_exactly_once(
        run.report.table_uri,
        published,
        pipeline.app_id,
        keys={seq: order(i)["order_id"] for i, seq in enumerate(published)},
        key_column="order_id",
    )
    assert result.ok, str(result)
    return run.report


def _others(cluster: LocalNatsCluster, node: LocalNatsServer) -> list[LocalNatsServer]:
    return [n for n in cluster.nodes if n is not node]


def test_stream_leader_killed_mid_drain(nats_cluster, stream_name, write_manifest, caplog):
    caplog.set_level(logging.INFO, logger="nilus_dagster")
    # The run connects elsewhere: the leader's death is an election it sees through routes.
    run, published, pipeline, _first = _start(
        nats_cluster,
        stream_name,
        write_manifest,
        8_000,
        lambda leader: _others(nats_cluster, leader)[0],
    )
    leader = _leader(nats_cluster, stream_name)
    leader.kill()
    time.sleep(3)
    leader.start()

    _finish(run, published, pipeline)


def test_connected_node_killed_mid_drain(nats_cluster, stream_name, write_manifest, caplog):
    caplog.set_level(logging.INFO, logger="nilus_dagster")
    # Not the leader: the run loses its connection while the stream stays available.
    run, published, pipeline, first = _start(
        nats_cluster,
        stream_name,
        write_manifest,
        8_000,
        lambda leader: _others(nats_cluster, leader)[0],
    )
    first.kill()
    time.sleep(3)
    first.start()

    _finish(run, published, pipeline)
    assert any("resuming after sequence" in r.getMessage() for r in caplog.records)


def test_rolling_restart_during_one_run(nats_cluster, stream_name, write_manifest, caplog):
    caplog.set_level(logging.INFO, logger="nilus_dagster")
    # At least 120 commits x 50 ms: the run outlasts three restarts on a fast machine too.
    run, published, pipeline, _first = _start(
        nats_cluster,
        stream_name,
        write_manifest,
        24_000,
        lambda leader: nats_cluster.nodes[0],
        pace=0.05,
    )
    restarted = 0
    for node in nats_cluster.nodes:
        # As an upgrade does it: stop (SIGTERM), start, and wait for it to rejoin.
        node.stop(remove_store=False)
        time.sleep(0.5)
        node.start()
        nats_cluster.wait_ready()
        restarted += run.is_alive()

    assert restarted == 3, "the run ended before every node was restarted; publish more"
    _finish(run, published, pipeline)


def test_stream_leader_paused_20s(nats_cluster, stream_name, write_manifest, caplog):
    caplog.set_level(logging.INFO, logger="nilus_dagster")
    # Connected to the leader: pulls and API requests both go silent, the hardest case.
    run, published, pipeline, _first = _start(
        nats_cluster, stream_name, write_manifest, 10_000, lambda leader: leader
    )
    leader = _leader(nats_cluster, stream_name)
    leader.pause()
    try:
        time.sleep(20)
    finally:
        leader.resume()

    _finish(run, published, pipeline)


def test_no_quorum_fails_after_failover_timeout_with_a_clear_error(
    nats_cluster, stream_name, write_manifest, monkeypatch
):
    subject = f"{stream_name}.orders"
    publisher = Publisher(nats_cluster.urls)  # type: ignore[arg-type]
    publisher.create_stream(stream_name, [f"{stream_name}.>"], num_replicas=3)
    published = publisher.publish_orders(subject, 100)
    path = write_manifest(
        address=f"nats+jetstream://{','.join(nats_cluster.hostports)}?subject={subject}",
        stream=stream_name,
    )
    pipeline = parse_pipeline(path)
    survivor, *gone = nats_cluster.nodes
    for node in gone:  # two of three: no stream leader can be elected
        node.kill()
    monkeypatch.setenv("NILUS_NATS_FAILOVER_TIMEOUT", "3")

    began = time.monotonic()
    with pytest.raises(SourceError) as failure:
        run_pipeline(pipeline, drain=True)
    took = time.monotonic() - began

    text = str(failure.value)
    assert "failover_timeout is 3s" in text or "within 3s (failover_timeout)" in text, text
    assert survivor.hostport in text and stream_name in text, text
    # Whichever the survivor gave last: JetStream's own "unavailable", silence, or a stream
    # info without a leader (a replica's own state, which the source refuses to trust).
    causes = ("temporarily unavailable", "no answer", "has no leader")
    assert any(cause in text for cause in causes), text
    # The bound, plus the request in flight when it ran out (5 s) and the check of the
    # connection that follows a failed attempt (2 s), on a loaded machine: never a hang.
    assert 3 <= took < 25, f"gave up after {took:.1f}s"
    for node in gone:
        node.start()
    nats_cluster.wait_ready()
    monkeypatch.delenv("NILUS_NATS_FAILOVER_TIMEOUT")
    report = run_pipeline(pipeline, drain=True)
    assert report.position == published[-1]
