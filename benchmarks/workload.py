"""What the benchmark feeds every path: realistic JSON orders, streams, and pipeline manifests."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

# One order, formatted rather than json.dumps'd: a million of them take a second, not ten.
_ORDER = (
    '{"order_id":"ord-%09d","customer_id":"cust-%05d","status":"%s","amount":%.2f,'
    '"currency":"EUR","channel":"%s","items":[{"sku":"sku-%04d","qty":%d,"price":%.2f}],'
    '"created_at":"2025-01-%02dT%02d:%02d:%02dZ","note":"%s"}'
)
_STATUS = ("created", "paid", "shipped", "delivered")
_CHANNEL = ("web", "app", "store")
_FILLER = "fragile; leave at the back door; call on arrival; gift wrap " * 64


def order(i: int, size: int = 220) -> bytes:
    """Order ``i`` as JSON, padded with a ``note`` to ``size`` bytes (never shorter than ~190)."""
    fields = (
        i,
        i % 9973,
        _STATUS[i % 4],
        10 + (i % 1000) * 0.37,
        _CHANNEL[i % 3],
        i % 211,
        1 + i % 3,
        3 + (i % 97) * 0.5,
        1 + i % 28,
        i // 3600 % 24,
        i // 60 % 60,
        i % 60,
    )
    bare = _ORDER % (*fields, "")
    pad = max(0, size - len(bare))
    if pad > len(_FILLER):
        return (_ORDER % (*fields, "x" * pad)).encode()
    return (_ORDER % (*fields, _FILLER[:pad])).encode()


def orders(start: int, count: int, size: int) -> Iterator[bytes]:
    return (order(i, size) for i in range(start, start + count))


async def create_stream(url: str, stream: str, subjects: list[str]) -> None:
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=subjects)
    finally:
        await nc.close()


async def publish(url: str, subject: str, count: int, size: int, start: int = 0) -> float:
    """Publish ``count`` orders as fast as the server acks them; returns seconds taken."""
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(publish_async_max_pending=20_000)
        began = time.perf_counter()
        for payload in orders(start, count, size):
            await js.publish_async(subject, payload)
        await asyncio.wait_for(js.publish_async_completed(), timeout=300)
        return time.perf_counter() - began
    finally:
        await nc.close()


async def stream_last_seq(url: str, stream: str) -> tuple[int, int]:
    """(messages, last_seq) of a stream."""
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.state.messages, info.state.last_seq
    finally:
        await nc.close()


def write_manifest(
    path: Path,
    *,
    name: str,
    hostport: str,
    stream: str,
    subject: str,
    batch_size: int,
    commit_rows: int,
    dest_table: str = "bench.orders",
    sensor_interval: int | None = None,
    sink_address: str = "dataos://bench?purpose=rw",
) -> Path:
    """A pipeline manifest over the benchmark stream, without partitions (drains in one run)."""
    path.write_text(
        f"""\
name: {name}
version: v1alpha
type: nilus
description: nilus_dagster benchmark pipeline
spec:
  type: stream
  source:
    address: "nats+jetstream://{hostport}?subject={subject}&batch_size={batch_size}&timeout=10"
    options:
      source_table: {stream}
      run_in_loop: true
  sink:
    address: "{sink_address}"
    options:
      dest_table: {dest_table}
      incremental_strategy: append
      commit_max_rows: {commit_rows}
  dagster:
    partitions: none
"""
        + (f"    sensor_interval_seconds: {sensor_interval}\n" if sensor_interval else "")
    )
    return path
