"""The table IO manager hands a pipeline's Delta table to downstream assets as Arrow, polars or
pandas, as each input is annotated (the partitioned window is the host project's test)."""

import dagster as dg
import pandas as pd
import polars as pl
import pyarrow as pa

from nilus_dagster.dagster import build_pipeline_definitions
from nilus_dagster.manifest import parse_pipeline


def _orders_definitions(nats_server, publisher, stream_name, write_manifest, extra=()):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    published = publisher.publish_orders(subject, 60)
    manifest = write_manifest(
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}&timeout=2",
        stream=stream_name,
        run_mode="per_tick",
    )
    pipeline_defs = build_pipeline_definitions(parse_pipeline(manifest))
    return published, dg.Definitions.merge(pipeline_defs, dg.Definitions(assets=list(extra)))


def test_downstream_inputs_come_as_the_annotated_frame_type(
    nats_server, publisher, stream_name, write_manifest
):
    seen: dict[str, object] = {}

    @dg.asset(ins={"orders": dg.AssetIn("orders")})
    def as_arrow(orders: pa.Table) -> None:
        seen["arrow"] = orders

    @dg.asset(ins={"orders": dg.AssetIn("orders")})
    def as_polars(orders: pl.DataFrame) -> None:
        seen["polars"] = orders

    @dg.asset(ins={"orders": dg.AssetIn("orders")})
    def as_pandas(orders: pd.DataFrame) -> None:
        seen["pandas"] = orders

    published, defs = _orders_definitions(
        nats_server, publisher, stream_name, write_manifest, (as_arrow, as_polars, as_pandas)
    )
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        upstream = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("orders")]
        )
        downstream = job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(k) for k in ("as_arrow", "as_polars", "as_pandas")],
        )

    assert upstream.success and downstream.success
    assert isinstance(seen["arrow"], pa.Table)
    assert isinstance(seen["polars"], pl.DataFrame)
    assert isinstance(seen["pandas"], pd.DataFrame)
    assert sorted(seen["arrow"]["_nats_seq"].to_pylist()) == published  # type: ignore[index]
    assert sorted(seen["polars"]["_nats_seq"].to_list()) == published  # type: ignore[index]
    assert sorted(seen["pandas"]["_nats_seq"].tolist()) == published  # type: ignore[index]
    assert seen["polars"]["order_id"][0] == seen["arrow"]["order_id"][0].as_py()  # type: ignore[index]
