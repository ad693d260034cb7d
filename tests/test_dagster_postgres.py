"""A PostgreSQL pipeline as a Dagster asset: kind, run metadata, column types, EnvVar secrets,
its table as a downstream asset's input, and the sensor's lag against its position."""

import dagster as dg
import pyarrow as pa

from nilus_dagster.dagster import (
    NatsResource,
    NilusTableIOManager,
    PostgresResource,
    SinkResource,
    build_nilus_asset,
    build_pipeline_definitions,
)
from nilus_dagster.dagster.translator import DagsterNilusTranslator
from nilus_dagster.manifest import parse_pipeline


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
    sink = SinkResource(
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


def test_the_resources_settings_stand_in_for_the_addresss_placeholders(
    password_postgres, publisher, stream_pipeline, monkeypatch
):
    server = password_postgres
    # None of these variables is set: the resource supplies every part they stand for.
    address = "postgresql://{PG_USER}:{PG_PASSWORD}@{PG_HOST}:5432/{PG_DB}"
    subject, pipeline = stream_pipeline(sink_address=address)
    published = publisher.publish_orders(subject, 40)
    for name in ("PG_USER", "PG_PASSWORD", "PG_HOST", "PG_DB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEPLOY_PG_PASSWORD", server["password"])
    sink = SinkResource(
        postgres=PostgresResource(
            host=server["host"],
            port=int(server["port"]),
            dbname=server["dbname"],
            user=server["user"],
            password=dg.EnvVar("DEPLOY_PG_PASSWORD"),
        )
    )
    asset = build_nilus_asset(pipeline)
    with dg.instance_for_test() as instance:
        resources = {
            "nats": NatsResource(),
            "nilus_sink": sink,
            "nilus_io_manager": NilusTableIOManager(sink=sink),
        }
        result = dg.materialize([asset], instance=instance, resources=resources)
        logs = " ".join(str(record.user_message) for record in instance.all_logs(result.run_id))

    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["nats/last_seq"].value == published[-1]
    # The table's address is the server the deployment wrote to, not the manifest's template.
    expected = f"postgresql://postgres@127.0.0.1:{server['port']}/postgres?table=analytics.orders"
    assert metadata["nilus/table_uri"].value == expected
    assert server["password"] not in logs + str(metadata)


def test_the_sensor_measures_lag_against_the_position_in_postgresql(
    postgres_database, nats_server, publisher, stream_name, write_manifest
):
    db = postgres_database
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    manifest = write_manifest(
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}&timeout=2",
        stream=stream_name,
        run_mode="per_tick",
        sink_address=f"postgresql://{db.user}@{db.host}:{db.port}/{db.name}",
    )
    defs = build_pipeline_definitions(parse_pipeline(manifest))
    sensor = defs.resolve_sensor_def("orders_sensor")

    def tick(instance: dg.DagsterInstance) -> dg.SensorResult:
        with dg.build_sensor_context(
            instance=instance, definitions=defs, resources=defs.resources
        ) as context:
            return sensor.evaluate_tick(context)

    def observed(data: dg.SensorResult) -> dict[str, object]:
        [event] = [e for e in data.asset_events if isinstance(e, dg.AssetObservation)]
        return {key: value.value for key, value in event.metadata.items()}

    published = publisher.publish_orders(subject, 30)
    with dg.instance_for_test() as instance:
        first = tick(instance)
        [request] = first.run_requests
        result = dg.materialize(
            [defs.get_assets_def("orders")],
            instance=instance,
            resources=defs.resources,
            tags=request.tags,
        )
        caught_up = tick(instance)
        publisher.publish_orders(subject, 7, start=30)
        behind = tick(instance)

    assert observed(first)["nats/sequence_lag"] == 30 and observed(first)["nilus/position"] == 0
    assert result.success
    assert not caught_up.run_requests and "up to date" in (caught_up.skip_message or "")
    now = observed(caught_up)
    assert now["nilus/position"] == published[-1] and now["nats/sequence_lag"] == 0
    # The newest row's time comes from the PostgreSQL table.
    assert 0 <= now["nats/lag_seconds"] < 60  # type: ignore[operator]
    assert observed(behind)["nats/sequence_lag"] == 7
    assert behind.run_requests[0].tags["nilus/position"] == str(published[-1])
