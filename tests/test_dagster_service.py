"""Service runs through Dagster's own APIs: the job, its reports, and the supervisor sensor."""

import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from nilus_dagster.dagster import build_nilus_definitions
from nilus_dagster.dagster.constants import HEARTBEAT_TAG, PID_TAG, SERVICE_TAG
from nilus_dagster.dagster.service import service_groups
from nilus_dagster.dagster.supervisor import QUEUED_TOO_LONG_SECONDS, RETRY_SECONDS, supervise
from nilus_dagster.engine import runtime_settings
from nilus_dagster.manifest import parse_pipeline
from tests.checker import check_exactly_once

JOB = "nilus_service_nilus"
SUPERVISOR = "nilus_service_nilus_supervisor"


def _write(tmp_path: Path, name: str, hostport: str, stream: str, partitions: str = "none") -> Path:
    folder = tmp_path / "pipelines"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""\
name: {name}
spec:
  type: stream
  source:
    address: nats+jetstream://{hostport}?subject={stream}.{name}&timeout=1
    options: {{source_table: {stream}, run_in_loop: true}}
  sink:
    address: dataos://lake?purpose=rw
    options: {{dest_table: analytics.{name}}}
  dagster:
    partitions: {partitions}
    run_mode: service
    service: {{run_seconds: 4, report_every_seconds: 0.5, poll_seconds: 0.1}}
"""
    )
    return path


def _uri(path: Path) -> str:
    return runtime_settings(parse_pipeline(path)).location.uri


def _publish_in_background(publisher, subject: str, count: int, every: float) -> tuple:
    seqs: list[int] = []

    def go() -> None:
        for start in range(0, count, 50):
            seqs.extend(publisher.publish_orders(subject, 50, start=start))
            time.sleep(every)

    thread = threading.Thread(target=go)
    thread.start()
    return thread, seqs


def _check_history(instance, key: dg.AssetKey, check: str):
    return instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(key, check), limit=50
    )


def test_service_run_reports_as_it_goes_and_ends_by_itself(
    tmp_path, nats_server, publisher, stream_name
):
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    path = _write(tmp_path, "orders", nats_server.hostport, stream_name, partitions="daily")
    defs = build_nilus_definitions(tmp_path / "pipelines")
    # Service pipelines get a service job and its supervisor, not a per-tick sensor.
    assert {s.name for s in defs.sensors} == {SUPERVISOR}
    thread, seqs = _publish_in_background(publisher, f"{stream_name}.orders", 300, 0.3)
    began = time.monotonic()
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def(JOB).execute_in_process(instance=instance)
        elapsed = time.monotonic() - began
        thread.join()
        assert result.success and 4 <= elapsed < 60, elapsed  # ends by itself (loaded CI: slow)
        key = dg.AssetKey("orders")
        materializations = instance.fetch_materializations(key, limit=100).records
        # Several reports within one run, at the cadence, with the run metadata.
        assert len(materializations) >= 3
        assert {r.run_id for r in materializations} == {result.run_id}
        today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        assert materializations[0].partition_key == today  # the newest message's window
        metadata = materializations[0].asset_materialization.metadata
        for name in ("nats/last_seq", "nats/sequence_lag", "nilus/rows_written", "nats/gap"):
            assert name in metadata, name
        for check in ("sequence_lag_within_bound", "no_gap", "dead_letters"):
            history = _check_history(instance, key, check)
            assert history and history[0].status == AssetCheckExecutionRecordStatus.SUCCEEDED
        run = instance.get_run_by_id(result.run_id)
        assert run.tags[SERVICE_TAG] == "nilus" and run.tags[HEARTBEAT_TAG] and run.tags[PID_TAG]
    # Everything published before the run ended is in the table once; the rest is next run's.
    written = check_exactly_once(_uri(path), seqs, "nilus-dagster/orders")
    assert not written.duplicated and not written.unexpected, written


def test_two_pipelines_in_one_run_one_fails_the_other_keeps_ingesting(
    tmp_path, nats_server, publisher, stream_name
):
    good, bad = f"{stream_name}G", f"{stream_name}B"
    publisher.create_stream(good, [f"{good}.>"])
    publisher.create_stream(bad, [f"{bad}.>"])
    good_path = _write(tmp_path, "good", nats_server.hostport, good)
    _write(tmp_path, "bad", nats_server.hostport, bad)
    publisher.publish_orders(f"{bad}.bad", 20)
    defs = build_nilus_definitions(tmp_path / "pipelines")
    # Both in the group's one service job (each keeps its own job for window backfills).
    assert sorted(j.name for j in defs.jobs) == sorted(["bad_job", "good_job", JOB])

    def delete_later() -> None:
        time.sleep(1.0)
        publisher.delete_stream(bad)

    deleter = threading.Thread(target=delete_later)
    deleter.start()
    thread, seqs = _publish_in_background(publisher, f"{good}.good", 400, 0.25)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def(JOB).execute_in_process(instance=instance)
        thread.join()
        deleter.join()
        assert result.success
        failed = [
            record
            for record in _check_history(instance, dg.AssetKey("bad"), "sequence_lag_within_bound")
            if record.status == AssetCheckExecutionRecordStatus.FAILED
        ]
        assert failed, "the failing pipeline's error shows on its asset"
        assert bad in failed[0].evaluation.description
        assert "ingestion failed" in failed[0].evaluation.description
        good_reports = instance.fetch_materializations(dg.AssetKey("good"), limit=100).records
        assert len(good_reports) >= 3
    written = check_exactly_once(_uri(good_path), seqs, "nilus-dagster/good")
    assert not written.duplicated and not written.unexpected, written
    assert len(written.lost) < 100  # at most the last batches, published after the run ended


@pytest.fixture
def supervised(tmp_path, nats_server, publisher, stream_name):
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    path = _write(tmp_path, "orders", nats_server.hostport, stream_name)
    defs = build_nilus_definitions(tmp_path / "pipelines")
    (group,) = service_groups([parse_pipeline(path)])
    with dg.instance_for_test() as instance:
        yield defs, instance, group


def _tick(supervised, now=None):
    defs, instance, group = supervised
    with dg.build_sensor_context(
        instance=instance, definitions=defs, resources=defs.resources
    ) as context:
        if now is None:
            return defs.resolve_sensor_def(SUPERVISOR).evaluate_tick(context)
        resources = defs.resources
        return supervise(context, group, JOB, resources["nats"], resources["nilus_sink"], now)


def _started_run(supervised, tags=None):
    from dagster._core.events import DagsterEvent, DagsterEventType

    defs, instance, _ = supervised
    run = instance.create_run_for_job(
        job_def=defs.resolve_job_def(JOB), tags={SERVICE_TAG: "nilus", **(tags or {})}
    )
    instance.report_dagster_event(
        DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name), run_id=run.run_id
    )
    return instance.get_run_by_id(run.run_id)


def test_supervisor_starts_a_service_run_when_none_is_alive(supervised):
    data = _tick(supervised)
    (request,) = data.run_requests
    assert request.job_name == JOB and request.tags[SERVICE_TAG] == "nilus"


def test_supervisor_leaves_a_live_run_alone_and_replaces_a_silent_one(supervised):
    _, instance, group = supervised
    now = time.time()
    run = _started_run(supervised, {HEARTBEAT_TAG: str(now)})
    assert run.status == dg.DagsterRunStatus.STARTED
    data = _tick(supervised, now=now + 5)
    assert not data.run_requests and "heartbeat 5s ago" in data.skip_reason.skip_message
    # No heartbeat for longer than the bound: the worker is gone (kill -9); replace it.
    data = _tick(supervised, now=now + group.dead_after_seconds + 10)
    (request,) = data.run_requests
    assert request.tags["nilus/replaces"] == run.run_id
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE


def test_supervisor_says_why_a_service_run_stays_queued(supervised):
    _, instance, _ = supervised
    from dagster._core.remote_origin import (
        InProcessCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    # Queued by a QueuedRunCoordinator whose run slots are all taken.
    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(python_file=__file__))
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), JOB)
    run = instance.add_run(
        dg.DagsterRun(
            job_name=JOB,
            status=dg.DagsterRunStatus.QUEUED,
            tags={SERVICE_TAG: "nilus"},
            remote_job_origin=origin,
        )
    )
    queued = instance.get_run_record_by_id(run.run_id)
    assert queued.dagster_run.status == dg.DagsterRunStatus.QUEUED
    born = queued.create_timestamp.timestamp()
    data = _tick(supervised, now=born + 5)
    assert not data.run_requests and data.skip_reason.skip_message.endswith("is QUEUED")
    data = _tick(supervised, now=born + QUEUED_TOO_LONG_SECONDS + 5)
    assert not data.run_requests and "max_concurrent_runs" in data.skip_reason.skip_message


def test_supervisor_backs_off_after_failures_and_says_why(supervised):
    _, instance, _ = supervised
    for _ in range(2):
        run = _started_run(supervised)
        instance.report_run_failed(run, message="stream ORDERS went away")
    now = time.time()
    data = _tick(supervised, now=now + 1)
    assert not data.run_requests
    assert "2 failure(s) in a row" in data.skip_reason.skip_message
    assert f"backoff {2 * RETRY_SECONDS:g}s" in data.skip_reason.skip_message
    assert "stream ORDERS went away" in data.skip_reason.skip_message
    # Past the backoff it tries again.
    data = _tick(supervised, now=now + 2 * RETRY_SECONDS + 5)
    assert len(data.run_requests) == 1


def test_service_run_stops_on_terminate_signal_and_commits_what_it_pulled(
    tmp_path, nats_server, publisher, stream_name
):
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    path = _write(tmp_path, "orders", nats_server.hostport, stream_name)
    path.write_text(path.read_text().replace("run_seconds: 4", "run_seconds: 60"))
    defs = build_nilus_definitions(tmp_path / "pipelines")
    thread, seqs = _publish_in_background(publisher, f"{stream_name}.orders", 300, 0.2)
    signalled: list[float] = []

    def terminate_once_ingesting() -> None:
        # SIGINT is what the code server sends a run worker on Dagster's terminate.
        deadline = time.monotonic() + 60
        while not (Path(_uri(path)) / "_delta_log").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    killer = threading.Thread(target=terminate_once_ingesting)
    killer.start()
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def(JOB).execute_in_process(
            instance=instance, raise_on_error=False
        )
        killer.join()
        elapsed = time.monotonic() - signalled[0]
        thread.join()
        assert elapsed < 8, f"took {elapsed:.1f}s to stop"
        assert not result.success
        assert instance.get_run_by_id(result.run_id).status in (
            dg.DagsterRunStatus.CANCELED,
            dg.DagsterRunStatus.FAILURE,
        )
    # The signal handler Dagster had is back.
    assert signal.getsignal(signal.SIGINT) is not None
    written = check_exactly_once(_uri(path), seqs, "nilus-dagster/orders")
    assert not written.duplicated and not written.unexpected, written
