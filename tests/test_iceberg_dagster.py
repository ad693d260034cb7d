"""An Iceberg pipeline through Dagster's own APIs: kinds, description, run metadata, schema."""

import dagster as dg
import pyarrow as pa
from checker import check_orders
from conftest import order

from nilus_dagster.dagster import (
    NatsResource,
    NilusTableIOManager,
    SinkResource,
    build_nilus_asset,
)
from nilus_dagster.dagster.translator import DagsterNilusTranslator

RESOURCES = {
    "nats": NatsResource(),
    "nilus_sink": SinkResource(),
    "nilus_io_manager": NilusTableIOManager(),
}


def test_materialize_an_iceberg_pipeline_records_its_metadata_and_kind(
    publisher, stream_pipeline, iceberg_depot
):
    iceberg_depot()
    subject, pipeline = stream_pipeline(query="&batch_size=100")
    payloads = [order(i) for i in range(250)]
    published = publisher.publish(subject, payloads)
    translator = DagsterNilusTranslator()
    spec = translator.get_asset_spec(pipeline)
    assert spec.kinds == {"nats", "iceberg"}
    assert "-> Iceberg table `lake.analytics.orders`" in (spec.description or "")
    asset = build_nilus_asset(pipeline)
    seen: dict[str, pa.Table] = {}

    @dg.asset(ins={"orders": dg.AssetIn(asset.key)})
    def order_count(orders: pa.Table) -> None:
        seen["orders"] = orders

    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], instance=instance, resources=RESOURCES)
        downstream = dg.materialize(
            [asset.to_source_asset(), order_count], instance=instance, resources=RESOURCES
        )

    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    location = pipeline.table_location()
    assert metadata["nilus/table_uri"].value == location.uri
    assert metadata["dagster/row_count"].value == 250
    assert (metadata["nats/first_seq"].value, metadata["nats/last_seq"].value) == (1, 250)
    assert metadata["nats/sequence_lag"].value == 0
    assert check_orders(location, published, pipeline.app_id, payloads).ok
    # A downstream asset gets the Iceberg table through the package's IO manager.
    assert downstream.success
    assert sorted(seen["orders"].column("_nats_seq").to_pylist()) == published
    # Once the table exists, the asset shows its columns (embedded catalog: no remote I/O).
    schema = translator.get_metadata(pipeline)["dagster/column_schema"].schema
    assert {"order_id", "_nats_seq", "_nats_timestamp"} <= {c.name for c in schema.columns}
