"""Latency from publish to committed row, read back from the Delta log itself.

A row is committed when the log entry that carries it appears: the modification time of the
``_delta_log/NNN.json`` whose ``txn`` version (the last stream sequence of the commit) first
reaches the row's sequence. A message is published when the stream stores it:
``_nats_timestamp``. Both clocks are this machine's, so the difference needs no correction.
"""

import asyncio
import bisect
import json
import os
import time
from pathlib import Path

from benchmarks.workload import orders


def commit_times(table_uri: str, app_id: str | None = None) -> list[tuple[int, int]]:
    """(txn version, commit time in ns) for every commit that carries a position, in order."""
    log = Path(table_uri.removeprefix("file://")) / "_delta_log"
    found: list[tuple[int, int]] = []
    for entry in sorted(log.glob("*.json")):
        mtime = entry.stat().st_mtime_ns
        for line in entry.read_text().splitlines():
            if '"txn"' not in line:
                continue
            txn = json.loads(line).get("txn")
            if txn and (app_id is None or txn.get("appId") == app_id):
                found.append((int(txn["version"]), mtime))
    found.sort()
    return found


def row_latencies(table_uri: str, app_id: str | None = None, skip_until: int = 0) -> list[float]:
    """Seconds from stream timestamp to commit, for each row with a sequence > ``skip_until``."""
    import pyarrow as pa
    from deltalake import DeltaTable

    commits = commit_times(table_uri, app_id)
    versions = [v for v, _ in commits]
    table = DeltaTable(table_uri).to_pyarrow_table(columns=["_nats_seq", "_nats_timestamp"])
    seqs = table["_nats_seq"].to_pylist()
    stamps = table["_nats_timestamp"].cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64())
    out: list[float] = []
    for seq, stamp in zip(seqs, stamps.to_pylist(), strict=True):
        if seq <= skip_until:
            continue
        i = bisect.bisect_left(versions, seq)
        if i < len(commits):
            out.append((commits[i][1] - stamp) / 1e9)
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def publish_steady(
    url: str, subject: str, rate: float, seconds: float, size: int, start: int = 0
) -> tuple[int, float]:
    """Publish at ``rate`` msg/s for ``seconds``; returns (messages, achieved rate)."""
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(publish_async_max_pending=20_000)
        payloads = orders(start, int(rate * seconds) + 1, size)
        total = int(rate * seconds)
        sent = 0
        began = time.perf_counter()
        while sent < total:
            due = min(total, int((time.perf_counter() - began) * rate))
            while sent < due:
                await js.publish_async(subject, next(payloads))
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.wait_for(js.publish_async_completed(), timeout=60)
        return sent, sent / (time.perf_counter() - began)
    finally:
        await nc.close()


def wait_for_commit(table_uri: str, seq: int, timeout: float) -> bool:
    """Wait until a commit with a position of at least ``seq`` is in the table's log."""
    deadline = time.monotonic() + timeout
    log = table_uri.removeprefix("file://") + "/_delta_log"
    while time.monotonic() < deadline:
        if os.path.isdir(log):
            times = commit_times(table_uri)
            if times and times[-1][0] >= seq:
                return True
        time.sleep(0.1)
    return False
