"""Manifest -> asset spec: key, group, description, tags, kinds, metadata, partitions, names."""

import textwrap
import time

import dagster as dg
import pyarrow as pa
from deltalake import write_deltalake

from nilus_dagster.dagster import DagsterNilusTranslator, build_nilus_asset
from nilus_dagster.manifest import parse_pipeline

SECRET = "s3cr3t-Pa55word"


def _manifest(
    tmp_path,
    *,
    dagster_block="",
    address=None,
    tags="[nilus-stream, Demo Tag]",
    dest_table="analytics.orders",
):
    address = address or "nats+jetstream://localhost:4222?subject=orders.created&timeout=7"
    path = tmp_path / "orders-flow.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: orders-flow
            tags: {tags}
            description: Orders into the lake.
            spec:
              type: stream
              source:
                address: "{address}"
                options: {{source_table: ORDERS, run_in_loop: true}}
              sink:
                address: dataos://lake?purpose=rw
                options: {{dest_table: "{dest_table}"}}
            """
        )
        + textwrap.indent(textwrap.dedent(dagster_block), "  ")
    )
    return parse_pipeline(path)


def test_spec_carries_key_group_description_tags_and_kinds(tmp_path):
    spec = DagsterNilusTranslator().get_asset_spec(_manifest(tmp_path))

    assert spec.key == dg.AssetKey(["orders-flow"])
    assert spec.group_name == "nilus"
    assert spec.description.startswith("Orders into the lake.")
    assert "`ORDERS`" in spec.description and "`lake.analytics.orders`" in spec.description
    assert spec.kinds == {"nats", "deltalake"}
    assert [dep.asset_key for dep in spec.deps] == [dg.AssetKey(["nats", "ORDERS"])]
    assert spec.tags["nilus-stream"] == ""
    assert spec.tags["Demo_Tag"] == ""  # not a valid tag key as written: made one


def test_group_and_partitions_follow_spec_dagster(tmp_path):
    pipeline = _manifest(
        tmp_path,
        dagster_block="""\
        dagster:
          group: streams
          partitions: hourly
          partitions_start: "2025-03-01"
        """,
    )
    spec = DagsterNilusTranslator().get_asset_spec(pipeline)

    assert spec.group_name == "streams"
    assert isinstance(spec.partitions_def, dg.HourlyPartitionsDefinition)
    assert spec.partitions_def.get_first_partition_key() == "2025-03-01-00:00"


def test_daily_partitions_include_the_window_filling_now(tmp_path):
    spec = DagsterNilusTranslator().get_asset_spec(_manifest(tmp_path))
    partitions = spec.partitions_def

    assert isinstance(partitions, dg.DailyPartitionsDefinition)
    assert partitions.get_first_partition_key() == "2020-01-01"
    now_key = partitions.get_partition_key_for_timestamp(time.time())
    assert partitions.get_last_partition_key() == now_key


def test_partitions_none_makes_an_unpartitioned_asset(tmp_path):
    pipeline = _manifest(tmp_path, dagster_block="dagster: {partitions: none}\n")
    asset = build_nilus_asset(pipeline)

    assert asset.partitions_def is None
    assert asset.backfill_policy is None


def test_asset_has_single_run_backfill_pool_and_checks(tmp_path):
    asset = build_nilus_asset(_manifest(tmp_path))

    assert asset.backfill_policy == dg.BackfillPolicy.single_run()
    assert asset.op.pool == "nilus/orders-flow"
    assert asset.op.name == "nilus_orders_flow"
    assert {key.name for key in asset.check_keys} == {
        "sequence_lag_within_bound",
        "no_gap",
        "dead_letters",
    }
    assert set(asset.required_resource_keys) >= {"nats", "nilus_sink"}


def test_static_metadata_is_redacted_and_points_at_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("NATS_PASSWORD", SECRET)
    address = "nats+jetstream://nilus:{NATS_PASSWORD}@localhost:4222?subject=orders.created"
    literal = f"nats+jetstream://nilus:{SECRET}@localhost:4222?subject=orders.created"
    for written in (address, literal):
        spec = DagsterNilusTranslator().get_asset_spec(_manifest(tmp_path, address=written))
        metadata = spec.metadata

        assert metadata["nats/stream"] == dg.MetadataValue.text("ORDERS")
        assert metadata["nats/subject"] == dg.MetadataValue.text("orders.created")
        assert metadata["nilus/table_uri"] == dg.MetadataValue.path(
            str(tmp_path / "lakehouse" / "lake" / "analytics" / "orders")
        )
        # Fully qualified: the depot, then schema.table.
        assert metadata["dagster/table_name"] == dg.MetadataValue.text("lake.analytics.orders")
        assert metadata["dagster/uri"] == dg.MetadataValue.text(
            str(tmp_path / "lakehouse" / "lake" / "analytics" / "orders")
        )
        references = metadata["dagster/code_references"].code_references
        assert references[0].file_path == str((tmp_path / "orders-flow.yaml").resolve())
        assert SECRET not in repr(metadata)
    # The placeholder is a variable name, useful to show; the literal password is masked.
    assert (
        "{NATS_PASSWORD}"
        in DagsterNilusTranslator()
        .get_metadata(_manifest(tmp_path, address=address))["nilus/source_address"]
        .value
    )
    assert "***" in metadata["nilus/source_address"].value


def test_a_table_given_by_location_is_named_by_its_depot_and_last_two_folders(tmp_path):
    location = tmp_path / "tables" / "raw" / "orders"

    metadata = DagsterNilusTranslator().get_metadata(_manifest(tmp_path, dest_table=str(location)))

    assert metadata["dagster/table_name"] == dg.MetadataValue.text("lake.raw.orders")
    assert metadata["nilus/table_uri"] == dg.MetadataValue.path(str(location))


def test_column_schema_appears_once_the_table_exists(tmp_path):
    pipeline = _manifest(tmp_path)
    assert "dagster/column_schema" not in DagsterNilusTranslator().get_metadata(pipeline)

    uri = tmp_path / "lakehouse" / "lake" / "analytics" / "orders"
    write_deltalake(
        str(uri),
        pa.table({"order_id": ["a"], "amount": pa.array([1.5], pa.float64())}),
    )
    schema = DagsterNilusTranslator().get_metadata(pipeline)["dagster/column_schema"].schema

    assert [(c.name, c.type) for c in schema.columns] == [
        ("order_id", "string"),
        ("amount", "double"),
    ]


def test_translator_methods_can_be_overridden(tmp_path):
    class Prefixed(DagsterNilusTranslator):
        def get_asset_key(self, pipeline):
            return dg.AssetKey(["streams", pipeline.name])

    asset = build_nilus_asset(_manifest(tmp_path), translator=Prefixed())

    assert asset.key == dg.AssetKey(["streams", "orders-flow"])
