"""The asset through Dagster's own APIs, against the real nats-server and real Delta tables."""

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from deltalake import DeltaTable

from nilus_dagster.dagster import (
    NatsResource,
    NilusTableIOManager,
    SinkResource,
    build_nilus_asset,
)
from nilus_dagster.manifest import parse_pipeline

RUN_METADATA_KEYS = {
    "nats/stream": dg.TextMetadataValue,
    "nats/subject": dg.TextMetadataValue,
    "nats/first_seq": dg.IntMetadataValue,
    "nats/last_seq": dg.IntMetadataValue,
    "nats/stream_last_seq": dg.IntMetadataValue,
    "nats/sequence_lag": dg.IntMetadataValue,
    "nats/lag_seconds": dg.FloatMetadataValue,
    "nats/gap": dg.IntMetadataValue,
    "dagster/row_count": dg.IntMetadataValue,
    "nilus/rows_written": dg.IntMetadataValue,
    "nilus/dead_letters": dg.IntMetadataValue,
    "nilus/messages_per_second": dg.FloatMetadataValue,
    "nilus/duration_seconds": dg.FloatMetadataValue,
    "nilus/table_uri": dg.PathMetadataValue,
}
RESOURCES = {
    "nats": NatsResource(),
    "nilus_sink": SinkResource(),
    "nilus_io_manager": NilusTableIOManager(),
}
NOW = datetime.now(timezone.utc)
TODAY, YESTERDAY, TWO_DAYS_AGO = (f"{(NOW - timedelta(days=d)).date()}" for d in range(3))


@pytest.fixture
def subject(publisher, stream_name):
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    return f"{stream_name}.orders"


def _pipeline(write_manifest, nats_server, stream, subject, query="", **kwargs):
    address = f"nats+jetstream://{nats_server.hostport}?subject={subject}&batch_size=50{query}"
    return parse_pipeline(write_manifest(address=address, stream=stream, **kwargs))


def _materialize(asset, instance, **kwargs):
    return dg.materialize([asset], instance=instance, resources=RESOURCES, **kwargs)


def _seqs(uri):
    return sorted(DeltaTable(uri).to_pyarrow_table(columns=["_nats_seq"])["_nats_seq"].to_pylist())


def _materialization(result, key):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == key][:1]
    return event.materialization


def _checks(result):
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def test_materialize_drains_and_records_every_run_metadata_key(
    nats_server, publisher, stream_name, subject, write_manifest
):
    seqs = publisher.publish_orders(subject, 300)
    pipeline = _pipeline(write_manifest, nats_server, stream_name, subject)
    asset = build_nilus_asset(pipeline)

    with dg.instance_for_test() as instance:
        result = _materialize(asset, instance)

    assert result.success
    metadata = _materialization(result, asset.key).metadata
    for key, kind in RUN_METADATA_KEYS.items():
        assert isinstance(metadata[key], kind), key
    assert metadata["nats/stream"].value == stream_name
    assert metadata["nats/subject"].value == subject
    assert (metadata["nats/first_seq"].value, metadata["nats/last_seq"].value) == (1, 300)
    assert metadata["nats/sequence_lag"].value == 0
    assert "nilus/durable" not in metadata
    assert "nilus/realigned" not in metadata
    assert metadata["dagster/row_count"].value == 300
    assert metadata["nilus/rows_written"].value == 300
    columns = {c.name for c in metadata["dagster/column_schema"].schema.columns}
    assert {"order_id", "_nats_seq", "_nats_subject", "_nats_timestamp"} <= columns
    assert _seqs(metadata["nilus/table_uri"].value) == seqs
    checks = _checks(result)
    assert {name: c.passed for name, c in checks.items()} == {
        "sequence_lag_within_bound": True,
        "no_gap": True,
        "dead_letters": True,
    }


def test_a_second_run_appends_only_what_is_new(
    nats_server, publisher, stream_name, subject, write_manifest
):
    first = publisher.publish_orders(subject, 120)
    asset = build_nilus_asset(_pipeline(write_manifest, nats_server, stream_name, subject))

    with dg.instance_for_test() as instance:
        _materialize(asset, instance)
        second = publisher.publish_orders(subject, 30, start=120)
        result = _materialize(asset, instance)

    metadata = _materialization(result, asset.key).metadata
    assert (metadata["nats/first_seq"].value, metadata["nats/last_seq"].value) == (121, 150)
    assert metadata["nilus/rows_written"].value == 30
    assert _seqs(metadata["nilus/table_uri"].value) == first + second


def test_partition_range_backfill_replaces_the_window_and_repeats_identically(
    nats_server, publisher, stream_name, subject, write_manifest
):
    seqs = publisher.publish_orders(subject, 200)
    asset = build_nilus_asset(_pipeline(write_manifest, nats_server, stream_name, subject))
    window = {
        "dagster/asset_partition_range_start": TWO_DAYS_AGO,
        "dagster/asset_partition_range_end": TODAY,
    }

    with dg.instance_for_test() as instance:
        uri = (
            _materialization(_materialize(asset, instance), asset.key)
            .metadata["nilus/table_uri"]
            .value
        )
        # Lose some rows of today's window: the backfill must bring back exactly those.
        DeltaTable(uri).delete("_nats_seq > 150")
        assert len(_seqs(uri)) == 150
        first = _materialize(asset, instance, tags=window)
        rows_after_first = DeltaTable(uri).to_pyarrow_table().sort_by("_nats_seq")
        second = _materialize(asset, instance, tags=window)
        rows_after_second = DeltaTable(uri).to_pyarrow_table().sort_by("_nats_seq")

    assert first.success and second.success
    assert _seqs(uri) == seqs
    assert rows_after_second.equals(rows_after_first)
    partitions = {e.partition for e in second.get_asset_materialization_events()}
    assert partitions == {TWO_DAYS_AGO, YESTERDAY, TODAY}


def test_materializing_todays_partition_ingests_what_is_pending_first(
    nats_server, publisher, stream_name, subject, write_manifest
):
    first = publisher.publish_orders(subject, 40)
    asset = build_nilus_asset(_pipeline(write_manifest, nats_server, stream_name, subject))

    with dg.instance_for_test() as instance:
        _materialize(asset, instance)
        pending = publisher.publish_orders(subject, 25, start=40)
        result = _materialize(asset, instance, partition_key=TODAY)

    metadata = _materialization(result, asset.key).metadata
    assert _seqs(metadata["nilus/table_uri"].value) == first + pending
    assert metadata["nats/sequence_lag"].value == 0


def test_windows_older_than_the_streams_retention_are_skipped_with_a_warning(
    nats_server, publisher, stream_name, write_manifest
):
    publisher.create_stream(stream_name, [f"{stream_name}.>"], max_msgs=10)
    subject = f"{stream_name}.orders"
    publisher.publish_orders(subject, 10)
    asset = build_nilus_asset(_pipeline(write_manifest, nats_server, stream_name, subject))
    backfill = {
        "dagster/asset_partition_range_start": TWO_DAYS_AGO,
        "dagster/asset_partition_range_end": TODAY,
    }

    with dg.instance_for_test() as instance:
        uri = _materialization(_materialize(asset, instance), asset.key).metadata
        uri = uri["nilus/table_uri"].value
        publisher.publish_orders(subject, 20, start=10)  # the stream keeps only 21..30
        _materialize(asset, instance, raise_on_error=False)  # a gap: 11..20 are lost
        # Today's window holds 1..10, which the stream no longer has: the replay keeps them.
        today = _materialize(asset, instance, partition_key=TODAY)
        whole = _materialize(asset, instance, tags=backfill)
        warnings = [e.message for e in instance.all_logs(today.run_id) if e.level >= 30]

    assert today.success and whole.success
    assert _seqs(uri) == list(range(1, 11)) + list(range(21, 31))
    metadata = _materialization(today, asset.key).metadata
    assert metadata["dagster/partition_row_count"].value == 10
    assert "dagster/partition_row_count" not in _materialization(whole, asset.key).metadata
    assert any("older messages were removed by retention" in w for w in warnings)


def test_checks_fail_on_lag_gap_and_warn_on_dead_letters(
    nats_server, publisher, stream_name, write_manifest
):
    publisher.create_stream(stream_name, [f"{stream_name}.>"], max_msgs=100)
    subject = f"{stream_name}.orders"
    publisher.publish_orders(subject, 5)
    pipeline = _pipeline(
        write_manifest,
        nats_server,
        stream_name,
        subject,
        run_in_loop=False,  # one batch (50) per run
    )
    path = pipeline.path
    path.write_text(path.read_text() + "  dagster: {max_lag: 40}\n")
    asset = build_nilus_asset(parse_pipeline(path))

    with dg.instance_for_test() as instance:
        _materialize(asset, instance)  # position 5
        publisher.publish_orders(subject, 150, start=5)  # seqs 6..155; 6..55 purged by max_msgs
        publisher.publish(subject, [b"not json"])  # seq 156
        result = _materialize(asset, instance)

    checks = _checks(result)
    assert not checks["no_gap"].passed
    assert checks["no_gap"].metadata["nats/gap"].value == 51  # 6..56 gone (max_msgs=100)
    assert not checks["sequence_lag_within_bound"].passed  # 57..156 pending, one batch of 50 taken
    assert checks["sequence_lag_within_bound"].severity == dg.AssetCheckSeverity.ERROR
    assert checks["dead_letters"].passed  # the bad payload is not in this batch yet


def test_dead_letters_warn_but_do_not_fail_the_run(
    nats_server, publisher, stream_name, subject, write_manifest
):
    publisher.publish_orders(subject, 3)
    publisher.publish(subject, [b"not json", b"[1, 2]"])
    asset = build_nilus_asset(_pipeline(write_manifest, nats_server, stream_name, subject))

    with dg.instance_for_test() as instance:
        result = _materialize(asset, instance)

    assert result.success
    dead = _checks(result)["dead_letters"]
    assert not dead.passed and dead.severity == dg.AssetCheckSeverity.WARN
    assert dead.metadata["nilus/dead_letters"].value == 2
    assert _materialization(result, asset.key).metadata["nilus/dead_letters"].value == 2


def test_an_unset_placeholder_fails_the_run_naming_the_variable(
    nats_server, publisher, stream_name, subject, write_manifest, monkeypatch
):
    monkeypatch.delenv("NILUS_TEST_PASSWORD", raising=False)
    address = (
        f"nats+jetstream://svc:{{NILUS_TEST_PASSWORD}}@{nats_server.hostport}?subject={subject}"
    )
    asset = build_nilus_asset(parse_pipeline(write_manifest(address=address, stream=stream_name)))

    with dg.instance_for_test() as instance:
        result = _materialize(asset, instance, raise_on_error=False)

    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "NILUS_TEST_PASSWORD is not set" in failure.step_failure_data.error.message


def test_resources_reach_the_engine(
    nats_server, publisher, stream_name, subject, write_manifest, tmp_path
):
    publisher.publish_orders(subject, 10)
    # The manifest points nowhere useful; the deployment's resources fix servers and storage.
    address = f"nats+jetstream://unreachable.invalid:1?subject={subject}"
    asset = build_nilus_asset(parse_pipeline(write_manifest(address=address, stream=stream_name)))
    lake = tmp_path / "deployment-lake"

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset],
            instance=instance,
            resources={
                "nats": NatsResource(servers=[nats_server.hostport]),
                "nilus_sink": SinkResource(lakehouse=str(lake)),
                "nilus_io_manager": NilusTableIOManager(),
            },
        )

    uri = _materialization(result, asset.key).metadata["nilus/table_uri"].value
    assert uri == str(lake / "lake" / "analytics" / "orders")
    assert len(_seqs(uri)) == 10


def test_launch_config_limits_a_run(nats_server, publisher, stream_name, subject, write_manifest):
    publisher.publish_orders(subject, 80)
    asset = build_nilus_asset(_pipeline(write_manifest, nats_server, stream_name, subject))

    with dg.instance_for_test() as instance:
        result = _materialize(
            asset,
            instance,
            run_config={"ops": {"nilus_orders": {"config": {"max_messages": 30}}}},
        )

    metadata = _materialization(result, asset.key).metadata
    assert metadata["nilus/rows_written"].value == 30
    assert metadata["nats/sequence_lag"].value == 50
