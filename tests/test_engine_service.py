"""The long-lived service: several pipelines in one loop, reports at a cadence, stop, failures."""

import asyncio
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nats

from nilus_dagster.engine import (
    RunReport,
    ServiceFailure,
    ServiceOptions,
    run_pipeline_async,
    runtime_settings,
    serve_pipelines_async,
)
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest.loader import Pipeline, parse_pipeline
from tests.checker import check_exactly_once
from tests.conftest import CLI, Publisher, order

FAST = ServiceOptions(report_every_seconds=0.5, report_every_commits=1000, poll_seconds=0.1)


async def _publish_steadily(
    url: str, subject: str, count: int, rate: float, start: int = 0
) -> list[int]:
    """Publish ``count`` orders at about ``rate`` msg/s; returns their sequences."""
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        seqs: list[int] = []
        for i in range(start, start + count):
            ack = await js.publish(subject, json.dumps(order(i)).encode())
            seqs.append(ack.seq)
            if i % 20 == 0:
                await asyncio.sleep(20 / rate)
        return seqs
    finally:
        await nc.close()


async def _caught_up(reports: list[RunReport], name: str, last_seq: int) -> None:
    """Wait (60 s at most) until ``name`` reported a position of ``last_seq``."""
    deadline = time.monotonic() + 60
    while not any(r.pipeline == name and r.position == last_seq for r in reports):
        assert time.monotonic() < deadline, [r for r in reports if r.pipeline == name][-1:]
        await asyncio.sleep(0.1)


def _table_uri(pipeline: Pipeline) -> str:
    return runtime_settings(pipeline).location.uri


def _manifest(
    write_manifest: Callable[..., Path], server: LocalNatsServer, name: str, stream: str
) -> Pipeline:
    path = write_manifest(
        name=name,
        address=f"nats+jetstream://{server.hostport}?subject={stream}.{name}",
        stream=stream,
        dest_table=f"analytics.{name}",
    )
    return parse_pipeline(path)


def test_service_ingests_while_publishing_reports_and_stops(
    nats_server: LocalNatsServer, stream_pipeline: Callable[..., tuple[str, Pipeline]]
) -> None:
    subject, pipeline = stream_pipeline()
    reports: list[RunReport] = []

    async def scenario() -> tuple[list[int], float]:
        stop = asyncio.Event()
        service = asyncio.create_task(
            serve_pipelines_async(
                [pipeline], stop=stop, options={pipeline.name: FAST}, on_report=reports.append
            )
        )
        seqs = await _publish_steadily(nats_server.url, subject, 600, rate=400)
        deadline = time.monotonic() + 60
        while not (reports and reports[-1].position == seqs[-1]):  # caught up and reported
            assert time.monotonic() < deadline, reports[-1:] or "no report"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a report with nothing new: the lag figures stay current
        asked = time.monotonic()
        stop.set()
        summaries = await service
        assert summaries[0].ended_by == "stop"
        return seqs, time.monotonic() - asked

    seqs, stop_seconds = asyncio.run(scenario())
    assert stop_seconds < 3, f"the service took {stop_seconds:.1f}s to stop"
    check = check_exactly_once(_table_uri(pipeline), seqs, pipeline.app_id)
    assert check.ok, check
    # Reports came at the cadence while it ran, and their ranges add up to everything.
    assert len(reports) >= 3, [r.messages for r in reports]
    committed = [r for r in reports if r.last_seq is not None]
    for before, after in itertools.pairwise(committed):
        assert after.first_seq == before.last_seq + 1
    assert committed[0].first_seq == seqs[0] and committed[-1].last_seq == seqs[-1]
    assert sum(r.messages for r in reports) == len(seqs)
    assert reports[-1].sequence_lag == 0 and reports[-1].row_count == len(seqs)
    assert all(r.duration_seconds < 5 for r in reports)  # the interval, not the whole service


def test_service_stopped_mid_stream_then_restarted_writes_everything_once(
    nats_server: LocalNatsServer, stream_pipeline: Callable[..., tuple[str, Pipeline]]
) -> None:
    # Small commits, so the stop lands between (and during) commits while messages keep coming.
    subject, pipeline = stream_pipeline(query="&batch_size=50", sink_options="commit_max_rows: 50")

    async def scenario() -> list[int]:
        publishing = asyncio.create_task(
            _publish_steadily(nats_server.url, subject, 3000, rate=1000)
        )
        for _ in range(3):
            stop = asyncio.Event()
            service = asyncio.create_task(
                serve_pipelines_async([pipeline], stop=stop, options={pipeline.name: FAST})
            )
            await asyncio.sleep(0.8)
            stop.set()
            (summary,) = await service
            assert summary.ended_by == "stop" and not summary.failures
        seqs = await publishing
        reports: list[RunReport] = []
        stop = asyncio.Event()
        last = asyncio.create_task(
            serve_pipelines_async(
                [pipeline], stop=stop, options={pipeline.name: FAST}, on_report=reports.append
            )
        )
        await _caught_up(reports, pipeline.name, seqs[-1])
        stop.set()
        await last
        return seqs

    seqs = asyncio.run(scenario())
    check = check_exactly_once(_table_uri(pipeline), seqs, pipeline.app_id)
    assert check.ok, check


def test_service_ends_by_itself_after_run_seconds(
    nats_server: LocalNatsServer, stream_pipeline: Callable[..., tuple[str, Pipeline]]
) -> None:
    subject, pipeline = stream_pipeline()
    seqs = Publisher(nats_server.url).publish_orders(subject, 100)
    began = time.monotonic()
    (summary,) = asyncio.run(
        serve_pipelines_async([pipeline], run_seconds=1.0, options={pipeline.name: FAST})
    )
    assert 1.0 <= time.monotonic() - began < 4
    assert summary.ended_by == "time" and summary.messages == 100 and summary.position == seqs[-1]


def test_one_failing_pipeline_does_not_stop_the_other(
    nats_server: LocalNatsServer,
    publisher: Publisher,
    stream_name: str,
    write_manifest: Callable[..., Path],
) -> None:
    good_stream, bad_stream = f"{stream_name}G", f"{stream_name}B"
    publisher.create_stream(good_stream, [f"{good_stream}.>"])
    publisher.create_stream(bad_stream, [f"{bad_stream}.>"])
    good = _manifest(write_manifest, nats_server, "good", good_stream)
    bad = _manifest(write_manifest, nats_server, "bad", bad_stream)
    publisher.publish_orders(f"{bad_stream}.bad", 50)
    failures: list[ServiceFailure] = []
    reports: list[RunReport] = []
    options = {p.name: FAST for p in (good, bad)}
    options["bad"] = ServiceOptions(
        report_every_seconds=0.3, poll_seconds=0.1, retry_seconds=0.3, retry_max_seconds=0.6
    )

    async def scenario() -> list[int]:
        stop = asyncio.Event()
        service = asyncio.create_task(
            serve_pipelines_async(
                [good, bad],
                stop=stop,
                options=options,
                on_report=reports.append,
                on_failure=failures.append,
            )
        )
        first = await _publish_steadily(nats_server.url, f"{good_stream}.good", 200, rate=400)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(publisher.delete_stream, bad_stream)
        more = await _publish_steadily(
            nats_server.url, f"{good_stream}.good", 200, rate=400, start=200
        )
        await _caught_up(reports, "good", more[-1])
        await asyncio.sleep(0.5)
        stop.set()
        summaries = await service
        assert [s.ended_by for s in summaries] == ["stop", "stop"]
        assert summaries[1].failures and not summaries[0].failures
        return first + more

    seqs = asyncio.run(scenario())
    check = check_exactly_once(_table_uri(good), seqs, good.app_id)
    assert check.ok, check
    bad_check = check_exactly_once(_table_uri(bad), range(1, 51), bad.app_id)
    assert bad_check.ok, bad_check
    # The failed pipeline was retried with a growing wait, and its error names the stream.
    assert len(failures) >= 2 and all(f.pipeline == "bad" for f in failures)
    assert bad_stream in failures[0].message and failures[0].message.startswith("bad: ")
    assert [f.attempt for f in failures[:2]] == [1, 2]
    assert {r.pipeline for r in reports} == {"good", "bad"}


def test_window_replays_during_a_service_keep_every_row_once(
    nats_server: LocalNatsServer,
    stream_pipeline: Callable[..., tuple[str, Pipeline]],
    sink_address: str,
) -> None:
    # Many small commits: the service commits between a replay's read and its write. Into
    # PostgreSQL, a replay deletes and reloads only rows up to the position it read.
    subject, pipeline = stream_pipeline(
        query="&batch_size=20", sink_options="commit_max_rows: 20", sink_address=sink_address
    )
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    window = (today, today + timedelta(days=1))
    replays: list[RunReport] = []

    async def scenario() -> list[int]:
        stop = asyncio.Event()
        reports: list[RunReport] = []
        service = asyncio.create_task(
            serve_pipelines_async(
                [pipeline], stop=stop, options={pipeline.name: FAST}, on_report=reports.append
            )
        )
        publishing = asyncio.create_task(
            _publish_steadily(nats_server.url, subject, 1500, rate=500)
        )
        await asyncio.sleep(0.5)
        while not publishing.done():
            replays.append(await run_pipeline_async(pipeline, window=window))
        seqs = await publishing
        await _caught_up(reports, pipeline.name, seqs[-1])
        stop.set()
        await service
        return seqs

    seqs = asyncio.run(scenario())
    check = check_exactly_once(_table_uri(pipeline), seqs, pipeline.app_id)
    assert check.ok, check
    # The replays replaced a prefix of the table while the service appended after it.
    assert len(replays) >= 2 and replays[-1].rows_written > 0


def test_cli_serve_ingests_until_sigint_then_exits_cleanly(
    nats_server: LocalNatsServer, stream_pipeline: Callable[..., tuple[str, Pipeline]]
) -> None:
    subject, pipeline = stream_pipeline()
    first = Publisher(nats_server.url).publish_orders(subject, 100)
    serve = subprocess.Popen(
        [*CLI, "serve", str(pipeline.path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        uri = _table_uri(pipeline)
        deadline = time.monotonic() + 60
        while not check_exactly_once(uri, first, pipeline.app_id).ok:
            assert time.monotonic() < deadline and serve.poll() is None, serve.stderr.read()
            time.sleep(0.2)
        more = Publisher(nats_server.url).publish_orders(subject, 50, start=100)
        while not check_exactly_once(uri, first + more, pipeline.app_id).ok:
            assert time.monotonic() < deadline and serve.poll() is None, serve.stderr.read()
            time.sleep(0.2)
    finally:
        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    assert "orders: 150 messages" in out and "ended by stop" in out, out


def test_a_subject_purged_between_polls_is_counted_as_a_gap(
    nats_server: LocalNatsServer,
    publisher: Publisher,
    stream_name: str,
    write_manifest: Callable[..., Path],
) -> None:
    # The service checks for a gap only when the stream removed something since its last
    # check; other subjects' messages alone never trigger it, a purge between polls does.
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    pipeline = _manifest(write_manifest, nats_server, "orders", stream_name)
    subject, other = f"{stream_name}.orders", f"{stream_name}.other"
    options = ServiceOptions(report_every_seconds=0.3, report_every_commits=1000, poll_seconds=0.2)
    reports: list[RunReport] = []

    def lose_seven() -> None:
        publisher.publish(subject, [order(i) for i in range(10, 17)])
        publisher.purge(stream_name, subject=subject)

    async def scenario() -> int:
        stop = asyncio.Event()
        first = await asyncio.to_thread(publisher.publish, subject, [order(i) for i in range(10)])
        service = asyncio.create_task(
            serve_pipelines_async(
                [pipeline], stop=stop, options={pipeline.name: options}, on_report=reports.append
            )
        )
        await _caught_up(reports, pipeline.name, first[-1])
        for i in range(3):  # the stream moves, nothing is removed
            await asyncio.to_thread(publisher.publish, other, [order(i)])
            await asyncio.sleep(0.3)
        # Published and purged while the loop (and so the service) is held: never pulled.
        holder = threading.Thread(target=lose_seven)
        holder.start()
        holder.join()
        last = await asyncio.to_thread(
            publisher.publish, subject, [order(i) for i in range(17, 20)]
        )
        await _caught_up(reports, pipeline.name, last[-1])
        stop.set()
        await service
        return sum(r.gap for r in reports if r.pipeline == pipeline.name)

    assert asyncio.run(scenario()) == 7
