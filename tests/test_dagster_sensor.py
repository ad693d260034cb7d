"""The sensor through build_sensor_context and a real instance, against the real nats-server."""

import time

import dagster as dg
import pytest
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from deltalake import DeltaTable

from nilus_dagster.dagster import NatsResource, build_pipeline_definitions
from nilus_dagster.jetstream.local_server import free_port
from nilus_dagster.manifest import parse_pipeline

SECRET = "Sup3r-s3cret-pw"


@pytest.fixture
def subject(publisher, stream_name):
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    return f"{stream_name}.orders"


def _defs(write_manifest, address, stream, **kwargs):
    manifest = write_manifest(address=address, stream=stream, run_mode="per_tick", **kwargs)
    return build_pipeline_definitions(parse_pipeline(manifest))


def _tick(defs, instance, name="orders_sensor", cursor=None):
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(
        instance=instance, definitions=defs, resources=defs.resources, cursor=cursor
    ) as context:
        return sensor.evaluate_tick(context)


def _observation(data):
    [event] = [e for e in data.asset_events if isinstance(e, dg.AssetObservation)]
    return {key: value.value for key, value in event.metadata.items()}


def _add_run(instance, status, *, tags=None, asset_selection=None):
    # Queued runs must say where they come from (the daemon launches them from there).
    origin = RemoteJobOrigin(
        RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("nilus"), "__repository__"),
        "__ASSET_JOB",
    )
    run = dg.DagsterRun(
        job_name="__ASSET_JOB",
        status=status,
        tags=tags or {},
        asset_selection=asset_selection,
        remote_job_origin=origin,
    )
    instance.add_run(run)
    return run


@pytest.fixture
def orders(nats_server, publisher, stream_name, subject, write_manifest):
    address = f"nats+jetstream://{nats_server.hostport}?subject={subject}&timeout=2"
    return _defs(write_manifest, address, stream_name)


def test_pending_messages_and_no_run_in_flight_request_a_run(
    orders, publisher, subject, stream_name
):
    publisher.publish_orders(subject, 25)

    with dg.instance_for_test() as instance:
        data = _tick(orders, instance)

    [request] = data.run_requests
    assert request.asset_selection == [dg.AssetKey("orders")]
    assert request.run_key is None  # a failed run is requested again on a later tick
    assert request.tags["nilus/pipeline"] == "orders"
    assert request.tags["nilus/mode"] == "append"
    assert request.tags["nilus/position"] == "0"
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert request.tags["dagster/asset_partition_range_start"] == today
    assert request.tags["dagster/asset_partition_range_end"] == today
    observation = _observation(data)
    assert observation["nats/sequence_lag"] == 25
    assert observation["nats/stream_last_seq"] == 25
    assert observation["nats/gap"] == 0
    assert observation["nilus/position"] == 0
    assert observation["nats/stream"] == stream_name
    assert "nats/lag_seconds" not in observation  # empty table: no newest message yet


def test_the_requested_run_ingests_and_the_next_tick_is_up_to_date(orders, publisher, subject):
    seqs = publisher.publish_orders(subject, 40)
    asset = orders.get_assets_def("orders")

    with dg.instance_for_test() as instance:
        [request] = _tick(orders, instance).run_requests
        result = dg.materialize(
            [asset], instance=instance, resources=orders.resources, tags=request.tags
        )
        data = _tick(orders, instance)
        publisher.publish_orders(subject, 5, start=40)
        later = _tick(orders, instance)

    uri = (
        result.get_asset_materialization_events()[0]
        .materialization.metadata["nilus/table_uri"]
        .value
    )
    assert sorted(DeltaTable(uri).to_pyarrow_table()["_nats_seq"].to_pylist()) == seqs
    assert {e.partition for e in result.get_asset_materialization_events()} == {
        request.tags["dagster/asset_partition_range_end"]
    }
    assert not data.run_requests
    assert "up to date" in data.skip_message
    observed = _observation(data)
    assert observed["nats/sequence_lag"] == 0 and observed["nilus/position"] == 40
    assert 0 <= observed["nats/lag_seconds"] < 60
    assert len(later.run_requests) == 1
    assert later.run_requests[0].tags["nilus/position"] == "40"


@pytest.mark.parametrize("status", [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED])
def test_no_request_while_a_run_of_the_pipeline_is_in_flight(orders, publisher, subject, status):
    publisher.publish_orders(subject, 10)

    with dg.instance_for_test() as instance:
        run = _add_run(instance, status, tags={"nilus/pipeline": "orders"})
        data = _tick(orders, instance)

    assert not data.run_requests
    assert run.run_id in data.skip_message and "10 messages pending" in data.skip_message
    assert _observation(data)["nats/sequence_lag"] == 10  # still recorded


def test_a_ui_run_of_the_asset_without_the_tag_also_counts_as_in_flight(orders, publisher, subject):
    publisher.publish_orders(subject, 3)

    with dg.instance_for_test() as instance:
        _add_run(instance, dg.DagsterRunStatus.STARTED, tags={"other": "run"})
        _add_run(
            instance,
            dg.DagsterRunStatus.QUEUED,
            asset_selection=frozenset({dg.AssetKey("orders")}),
        )
        data = _tick(orders, instance)

    assert not data.run_requests and "QUEUED" in data.skip_message


def test_a_failed_run_is_retried_on_a_later_tick(orders, publisher, subject):
    publisher.publish_orders(subject, 10)

    with dg.instance_for_test() as instance:
        _add_run(instance, dg.DagsterRunStatus.FAILURE, tags={"nilus/pipeline": "orders"})
        first = _tick(orders, instance)
        second = _tick(orders, instance)

    assert len(first.run_requests) == 1 and len(second.run_requests) == 1


def test_server_down_skips_fast_and_says_so_without_the_secret(
    stream_name, write_manifest, monkeypatch
):
    monkeypatch.setenv("NILUS_TEST_PASSWORD", SECRET)
    address = f"nats+jetstream://svc:{{NILUS_TEST_PASSWORD}}@127.0.0.1:{free_port()}?subject=x"
    defs = _defs(write_manifest, address, stream_name)

    with dg.instance_for_test() as instance:
        started = time.monotonic()
        data = _tick(defs, instance)
        elapsed = time.monotonic() - started

    assert elapsed < 5
    assert not data.run_requests and not data.asset_events
    assert "cannot measure the lag" in data.skip_message
    assert SECRET not in data.skip_message


def test_unset_placeholder_skips_naming_the_variable(stream_name, write_manifest, monkeypatch):
    monkeypatch.delenv("NILUS_TEST_TOKEN", raising=False)
    defs = _defs(
        write_manifest, "nats+jetstream://{NILUS_TEST_TOKEN}@127.0.0.1:4?subject=x", stream_name
    )

    with dg.instance_for_test() as instance:
        started = time.monotonic()
        data = _tick(defs, instance)

    assert time.monotonic() - started < 5
    assert "NILUS_TEST_TOKEN is not set" in data.skip_message


def test_unpartitioned_pipelines_get_runs_without_a_partition_range(
    nats_server, publisher, stream_name, subject, write_manifest
):
    path = write_manifest(
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}", stream=stream_name
    )
    path.write_text(path.read_text() + "  dagster: {partitions: none, run_mode: per_tick}\n")
    defs = build_pipeline_definitions(path)
    publisher.publish_orders(subject, 2)

    with dg.instance_for_test() as instance:
        [request] = _tick(defs, instance).run_requests

    assert "dagster/asset_partition_range_start" not in request.tags
    assert request.tags["nilus/mode"] == "append"


def test_a_hung_server_is_bounded_by_the_resources_timeouts(
    nats_server_factory, stream_name, write_manifest
):
    server = nats_server_factory()
    defs = _defs(write_manifest, f"nats+jetstream://{server.hostport}?subject=x", stream_name)
    resources = {
        **defs.resources,
        "nats": NatsResource(connect_timeout=1.0, probe_timeout=2.0),
    }
    server.pause()  # accepts TCP connections, answers nothing
    try:
        with dg.instance_for_test() as instance:
            sensor = defs.resolve_sensor_def("orders_sensor")
            started = time.monotonic()
            with dg.build_sensor_context(
                instance=instance, definitions=defs, resources=resources
            ) as context:
                data = sensor.evaluate_tick(context)
            elapsed = time.monotonic() - started
    finally:
        server.resume()

    assert elapsed < 5
    assert not data.run_requests
    assert "cannot reach NATS" in data.skip_message


def test_a_recreated_stream_is_reported_and_no_run_is_requested(
    orders, publisher, subject, stream_name
):
    publisher.publish_orders(subject, 5)
    asset = orders.get_assets_def("orders")

    with dg.instance_for_test() as instance:
        dg.materialize([asset], instance=instance, resources=orders.resources)
        publisher.delete_stream(stream_name)
        publisher.create_stream(stream_name, [f"{stream_name}.>"])
        publisher.publish_orders(subject, 8)
        data = _tick(orders, instance)

    assert not data.run_requests
    assert "recreated" in data.skip_message
    assert _observation(data)  # the figures are still recorded


def test_lag_is_recorded_when_it_changes_and_the_check_when_its_result_changes(
    nats_server, publisher, stream_name, subject, write_manifest
):
    path = write_manifest(
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}", stream=stream_name
    )
    path.write_text(path.read_text() + "  dagster: {run_mode: per_tick, max_lag: 12}\n")
    defs = build_pipeline_definitions(parse_pipeline(path))
    publisher.publish_orders(subject, 10)

    with dg.instance_for_test() as instance:
        first = _tick(defs, instance)
        same = _tick(defs, instance, cursor=first.cursor)
        publisher.publish_orders(subject, 5, start=10)
        changed = _tick(defs, instance, cursor=same.cursor)

    kinds = [type(e).__name__ for e in first.asset_events]
    assert kinds == ["AssetObservation", "AssetCheckEvaluation"]
    assert not same.asset_events and same.run_requests  # nothing new to record; still a run
    [observation, check] = changed.asset_events  # the lag moved, and past the bound
    assert observation.metadata["nats/sequence_lag"].value == 15
    assert check.check_name == "sequence_lag_within_bound" and not check.passed


def test_a_probe_over_its_budget_is_cut_short(orders, publisher, subject):
    publisher.publish_orders(subject, 3)
    resources = {**orders.resources, "nats": NatsResource(probe_timeout=0.001)}

    with dg.instance_for_test() as instance:
        sensor = orders.resolve_sensor_def("orders_sensor")
        with dg.build_sensor_context(
            instance=instance, definitions=orders, resources=resources
        ) as context:
            data = sensor.evaluate_tick(context)

    assert not data.run_requests
    assert "did not finish within 0.001s" in data.skip_message
