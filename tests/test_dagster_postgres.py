"""A PostgreSQL pipeline as a Dagster asset: kind, run metadata, column types, EnvVar secrets,
and its table as a downstream asset's input."""

import dagster as dg
import pyarrow as pa

from nilus_dagster.dagster import (
    DeltaSinkResource,
    NatsResource,
    NilusTableIOManager,
    PostgresResource,
    build_nilus_asset,
)
from nilus_dagster.dagster.translator import DagsterNilusTranslator


def test_materialize_into_postgresql_with_connection_settings_from_the_resource(
    postgres_database, publisher, stream_pipeline, monkeypatch
):
    db = postgres_database
    # The manifest names a user that does not exist; the deployment's resource replaces it.
    address = f"postgresql://nobody:{{PG_PASSWORD}}@{db.host}:{db.port}/{db.name}"
    subject, pipeline = stream_pipeline(sink_address=address)
    published = publisher.publish_orders(subject, 120)
    monkeypatch.setenv("PG_PASSWORD", "manifest-pw-123")
    monkeypatch.setenv("DEPLOY_PG_PASSWORD", "resource-pw-456")
    sink = DeltaSinkResource(
        postgres=PostgresResource(user=db.user, password=dg.EnvVar("DEPLOY_PG_PASSWORD"))
    )
    asset = build_nilus_asset(pipeline)
    assert DagsterNilusTranslator().get_kinds(pipeline) == {"nats", "postgres"}
    seen: dict[str, pa.Table] = {}

    @dg.asset(ins={"orders": dg.AssetIn(asset.key)})
    def order_count(orders: pa.Table) -> None:
        seen["orders"] = orders

    resources = {
        "nats": NatsResource(),
        "nilus_sink": sink,
        "nilus_io_manager": NilusTableIOManager(sink=sink),
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], instance=instance, resources=resources)
        downstream = dg.materialize(
            [asset.to_source_asset(), order_count], instance=instance, resources=resources
        )
        logs = " ".join(str(record.user_message) for record in instance.all_logs(result.run_id))

    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["nats/last_seq"].value == published[-1]
    assert metadata["dagster/row_count"].value == 120
    assert metadata["nilus/table_uri"].value.endswith(f"/{db.name}?table=analytics.orders")
    columns = {c.name: c.type for c in metadata["dagster/column_schema"].value.columns}
    assert columns["items"] == "jsonb" and columns["_nats_seq"] == "bigint"
    text = logs + str(metadata)
    assert "resource-pw-456" not in text and "manifest-pw-123" not in text
    assert db.query("SELECT count(*) FROM analytics.orders") == [(120,)]
    # The downstream asset reads the PostgreSQL table through the package's IO manager.
    assert downstream.success
    assert sorted(seen["orders"].column("_nats_seq").to_pylist()) == published
