"""The host's own assets: one unrelated to the pipelines, and one downstream of the Nilus
asset, partitioned like it, that reads exactly its window's rows."""

import os

import dagster as dg
import pyarrow as pa

DAILY = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1, timezone="UTC")


@dg.asset
def unrelated() -> dict[str, int]:
    """Runs on the host's executor: its step's process and that process's parent."""
    return {"pid": os.getpid(), "ppid": os.getppid()}


@dg.asset(partitions_def=DAILY)
def daily_orders(context: dg.AssetExecutionContext, host_orders: pa.Table) -> dict[str, object]:
    """The day's orders, as the Nilus IO manager hands them over."""
    window = context.partition_time_window
    return {
        "seqs": sorted(host_orders["_nats_seq"].to_pylist()),
        "window": (window.start.isoformat(), window.end.isoformat()),
    }


@dg.asset
def order_count(host_orders: pa.Table) -> int:
    """Unpartitioned: the whole table."""
    return host_orders.num_rows


@dg.asset(deps=["host_orders"])
def orders_audit() -> str:
    """Depends on the table without loading it."""
    return "checked"
