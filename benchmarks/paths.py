"""The in-process benchmark paths, each run in a fresh interpreter by the orchestrator.

``python -m benchmarks.paths NAME 'JSON'`` runs one path and prints one JSON line: what it
received or committed and ``seconds``, the time of the work itself (connect to last commit),
interpreter start-up and imports excluded (the orchestrator's wall time includes them).
"""

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.postgres import pg_ceiling, pg_peer

Params = dict[str, Any]


async def ceiling(p: Params) -> Params:
    """The raw ceiling: send JetStream pull requests ourselves and drain the inbox in bulk.

    Messages are only received and counted (no metadata parsing, no decoding, no writes): the
    fastest a Python consumer on nats-py can take messages off the wire.
    """
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    began = time.perf_counter()
    nc = await nats.connect(p["url"], connect_timeout=5, max_reconnect_attempts=0)
    js = nc.jetstream()
    info = await js.add_consumer(
        p["stream"],
        ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=p["subject"],
            inactive_threshold=60.0,
        ),
    )
    inbox = nc.new_inbox()
    # Unbounded: the loop below drains the queue itself, so nats-py's pending accounting
    # (decremented only by next_msg) must not call it a slow consumer.
    sub = await nc.subscribe(inbox, pending_msgs_limit=0, pending_bytes_limit=0)
    # Bulk drain: get_nowait() until empty, no per-message await (nats-py private queue).
    queue = sub._pending_queue  # noqa: SLF001 - the ceiling loop is what a bulk drain can do
    request = f"$JS.API.CONSUMER.MSG.NEXT.{p['stream']}.{info.name}"
    batch = int(p["pull"])
    body = json.dumps({"batch": batch, "expires": 5_000_000_000}).encode()
    expected = int(p["count"])
    received = requested = nbytes = 0
    last_reply = ""
    deadline = time.monotonic() + float(p.get("timeout", 300))
    while received < expected:
        # Two pulls in flight: the server always has a request to fill while we drain.
        while requested - received < 2 * batch:
            await nc.publish(request, body, reply=inbox)
            requested += batch
        msgs = [await asyncio.wait_for(queue.get(), 10)]
        while not queue.empty():
            msgs.append(queue.get_nowait())
        for msg in msgs:
            if msg.reply:
                received += 1
                nbytes += len(msg.data)
                last_reply = msg.reply
            else:
                # A status (408 expired, 409): that pull is over; ask again.
                requested = received
        if time.monotonic() > deadline:
            raise TimeoutError(f"ceiling received {received} of {expected}")
    seconds = time.perf_counter() - began
    await nc.close()
    last_seq = int(last_reply.split(".")[-4]) if last_reply else 0
    return {"messages": received, "bytes": nbytes, "seconds": seconds, "last_seq": last_seq}


async def source(p: Params) -> Params:
    """The jetstream layer's own puller, receive only (what the engine pulls through)."""
    from nilus_dagster.engine.settings import runtime_settings
    from nilus_dagster.jetstream import JetStreamSource
    from nilus_dagster.manifest import parse_pipeline

    pipeline = parse_pipeline(p["manifest"])
    settings = runtime_settings(pipeline)
    began = time.perf_counter()
    received = nbytes = last_seq = 0
    async with JetStreamSource(settings.address, pipeline.stream) as src:
        target = (await src.stream_state()).last_seq
        async for batch in src.messages(1, stop_at_seq=target):
            received += len(batch)
            nbytes += batch.nbytes
            last_seq = batch.last_seq
    seconds = time.perf_counter() - began
    return {"messages": received, "bytes": nbytes, "seconds": seconds, "last_seq": last_seq}


async def baseline(p: Params) -> Params:
    """What a user writes: ``pull_subscribe`` + ``fetch(batch_size)`` + one Delta append each.

    The consumer is ephemeral with ``AckPolicy.NONE``, like the engine's default, so neither
    side pays for acks.
    """
    import nats
    import pyarrow as pa
    from deltalake import write_deltalake
    from nats.js.api import AckPolicy, ConsumerConfig

    began = time.perf_counter()
    nc = await nats.connect(p["url"], connect_timeout=5, max_reconnect_attempts=0)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        p["subject"], stream=p["stream"], config=ConsumerConfig(ack_policy=AckPolicy.NONE)
    )
    expected = int(p["count"])
    received = nbytes = commits = 0
    while received < expected:
        msgs = await sub.fetch(int(p["pull"]), timeout=10)
        rows = []
        for msg in msgs:
            row = json.loads(msg.data)
            row["_nats_seq"] = msg.metadata.sequence.stream
            rows.append(row)
            nbytes += len(msg.data)
        write_deltalake(p["table_uri"], pa.Table.from_pylist(rows), mode="append")
        received += len(msgs)
        commits += 1
    seconds = time.perf_counter() - began
    await nc.close()
    return {"messages": received, "bytes": nbytes, "seconds": seconds, "commits": commits}


def engine(p: Params) -> Params:
    """The engine in-process: ``run_pipeline`` draining the backlog."""
    from nilus_dagster.engine import run_pipeline
    from nilus_dagster.manifest import parse_pipeline

    pipeline = parse_pipeline(p["manifest"])
    began = time.perf_counter()
    report = run_pipeline(pipeline, drain=True)
    seconds = time.perf_counter() - began
    return {
        "messages": report.messages,
        "bytes": report.bytes,
        "seconds": seconds,
        "rows": report.rows_written,
        "commits": report.commits,
        "position": report.position,
        "run_seconds": report.duration_seconds,
    }


def engine_profile(p: Params) -> Params:
    """:func:`engine` under a profiler; writes the profile next to ``p['profile']``."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = engine(p)
    profiler.disable()
    profiler.dump_stats(p["profile"])
    with open(p["profile"] + ".txt", "w") as out:
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(60)
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
    return result


def engine_loop(p: Params) -> Params:
    """Back-to-back engine runs, as sensor-requested runs would be, until told to stop.

    A run drains what is pending; when it found nothing, the loop waits ``poll`` seconds (a
    sensor's interval) before the next. The orchestrator writes the last published sequence
    into ``stop_file``; the loop ends once that is committed.
    """
    from nilus_dagster.engine import run_pipeline
    from nilus_dagster.manifest import parse_pipeline

    pipeline = parse_pipeline(p["manifest"])
    stop = Path(p["stop_file"])
    poll = float(p["poll"])
    runs = messages = 0
    began = time.perf_counter()
    deadline = time.monotonic() + float(p.get("timeout", 600))
    while time.monotonic() < deadline:
        report = run_pipeline(pipeline, drain=True)
        runs += 1
        messages += report.messages
        last = stop.read_text().strip() if stop.exists() else ""
        if last and report.position >= int(last):
            break
        if not report.messages:
            time.sleep(poll)
    return {"messages": messages, "runs": runs, "seconds": time.perf_counter() - began}


PATHS: dict[str, Callable[[Params], Any]] = {
    "ceiling": ceiling,
    "source": source,
    "baseline": baseline,
    "engine": engine,
    "engine_profile": engine_profile,
    "engine_loop": engine_loop,
    "pg_ceiling": pg_ceiling,
    "pg_peer": pg_peer,
}


def main(argv: list[str]) -> int:
    name, params = argv[0], json.loads(argv[1])
    result = PATHS[name](params)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
