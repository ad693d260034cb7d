"""The PostgreSQL sink's paths of ``python -m benchmarks``, side by side on the same orders.

- ``pg-cli``: ``nilus-dagster run PIPELINE.yaml --drain`` into PostgreSQL, the whole process.
- ``pg-ceiling``: one bulk load (ADBC ``adbc_ingest``, binary ``COPY``) of the same orders as
  Arrow rows, decoded, shaped for PostgreSQL and cut into the sink's ``COPY`` batches beforehand
  (untimed): the fastest the database takes these rows from Python, with no NATS and no
  decoding.
- ``pg-peer``: what a dlt user writes: nats-py ``pull_subscribe`` + ``fetch(batch_size)`` +
  ``json.loads`` feeding a dlt resource, loaded by one ``pipeline.run`` into dlt's ``postgres``
  destination.

Each run gets a database of its own on the machine's PostgreSQL (``--pg-url``, default
``postgresql://postgres@127.0.0.1:5432/postgres``: the server, and the database to create the
others from), dropped afterwards; every path's table is checked to hold each published
sequence exactly once.
"""

import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from benchmarks import workload
from benchmarks.measure import run_process

PATHS = ("pg-cli", "pg-ceiling", "pg-peer")
LABELS = {
    "pg-cli": ("PostgreSQL: `nilus-dagster run` (whole process)", "process"),
    "pg-ceiling": ("PostgreSQL ceiling: one adbc_ingest of the same Arrow rows", "run"),
    "pg-peer": ("PostgreSQL peer: fetch() + dlt postgres destination", "run"),
}
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BIN = Path(sys.executable).parent


def database_url(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


def _admin(server_url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def table_rows(url: str, table: str) -> tuple[int, int, int]:
    """(rows, distinct sequences, max sequence) of ``table`` (``schema.table``)."""
    import psycopg

    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not found or not found[0]:
            return 0, 0, 0
        rows, distinct, top = conn.execute(  # type: ignore[misc]
            f"SELECT count(*), count(DISTINCT _nats_seq), coalesce(max(_nats_seq), 0) FROM {table}"
        ).fetchone()
    return int(rows), int(distinct), int(top)


def run_path(bench: Any, key: str, round_: int) -> dict[str, Any]:
    """One run of a PostgreSQL path in a fresh database; the orchestrator's result record."""
    args = bench.args
    name = f"nilus_bench_{key.replace('-', '_')}_{round_}"
    _admin(args.pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(args.pg_url, f'CREATE DATABASE "{name}"')
    url = database_url(args.pg_url, name)
    expected = bench.counts["main"]
    common = {"url": bench.url, "stream": "BENCH", "subject": "bench.orders", "count": expected}
    label, timed = LABELS[key]
    inner: dict[str, Any] = {}
    table = "analytics.orders"
    try:
        if key == "pg-cli":
            manifest = workload.write_manifest(
                bench.work / f"pg-{round_}.yaml",
                name="bench_pg",
                hostport=bench.hostport,
                stream="BENCH",
                subject="bench.orders",
                batch_size=args.batch_size,
                commit_rows=args.commit_rows,
                dest_table=table,
                sink_address=url,
            )
            argv = [str(BIN / "nilus-dagster"), "run", str(manifest), "--drain"]
            proc = run_process(argv, env=bench.env(bench.work / "lake-pg"), timeout=args.timeout)
        else:
            params = {
                **common,
                "db_url": url,
                "pull": args.batch_size,
                "size": args.size,
                "pipelines_dir": str(bench.work / f"dlt-{round_}"),
            }
            env = bench.env(bench.work / "lake-pg")
            proc = bench.run_child(key.replace("-", "_"), params, env)
            if key == "pg-peer":
                table = "nats_orders.orders"
        error = None
        if proc.returncode != 0:
            error = f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"
        elif timed == "run":
            import json

            inner = json.loads(proc.stdout.strip().splitlines()[-1])
        rows, distinct, top = table_rows(url, table)
    finally:
        _admin(args.pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    rows_ok = rows == distinct == expected and top == expected
    if not rows_ok and error is None:
        error = f"expected {expected} rows, got {rows} ({distinct} distinct, max {top})"
    seconds = float(inner["seconds"]) if timed == "run" and inner else proc.wall_seconds
    return {
        "key": key,
        "label": label,
        "timed": timed,
        "data": "main",
        "messages": rows,
        "expected": expected,
        "rows_ok": rows_ok,
        "seconds": seconds,
        "wall_seconds": proc.wall_seconds,
        "msg_per_s": rows / seconds if seconds and rows_ok else None,
        "mb_per_s": bench.bytes["main"] / 1e6 / seconds if seconds and rows_ok else None,
        "peak_rss_mb": proc.max_rss_bytes / 1e6,
        "tree_rss_mb": proc.tree_rss_bytes / 1e6,
        "inner": inner,
        "error": error,
    }


def pg_ceiling(p: dict[str, Any]) -> dict[str, Any]:
    """One bulk load of the orders as Arrow rows, shaped for PostgreSQL beforehand (untimed)."""
    import adbc_driver_postgresql.dbapi as adbc

    from nilus_dagster.messages import MessageBatch
    from nilus_dagster.sink.decode import decode
    from nilus_dagster.sink.postgres_connection import copy_batches
    from nilus_dagster.sink.postgres_types import column_for, postgres_type

    count = int(p["count"])
    payloads = list(workload.orders(0, count, int(p["size"])))
    now = time.time_ns()
    batch = MessageBatch(list(range(1, count + 1)), [now] * count, [p["subject"]] * count, payloads)
    rows = decode(batch).rows
    columns = {f.name: postgres_type(f.type) or "text" for f in rows.schema}
    shaped = copy_batches(
        rows.__class__.from_arrays(
            [column_for(rows.column(n), k) for n, k in columns.items()], names=list(columns)
        )
    )
    body = ", ".join(f'"{n}" {k}' for n, k in columns.items())
    began = time.perf_counter()
    with adbc.connect(p["db_url"]) as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE SCHEMA analytics")
            cur.execute(f"CREATE TABLE analytics.orders ({body})")
            cur.adbc_ingest("orders", shaped, mode="append", db_schema_name="analytics")
        conn.commit()
    seconds = time.perf_counter() - began
    return {"messages": count, "seconds": seconds}


async def pg_peer(p: dict[str, Any]) -> dict[str, Any]:
    """nats-py ``fetch()`` batches feeding dlt's postgres destination in one ``run``."""
    import json

    import dlt
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    began = time.perf_counter()
    nc = await nats.connect(p["url"], connect_timeout=5, max_reconnect_attempts=0)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        p["subject"], stream=p["stream"], config=ConsumerConfig(ack_policy=AckPolicy.NONE)
    )
    expected = int(p["count"])
    received = 0
    batches = []
    # dlt's resources are synchronous generators: fetch everything first (what a dlt user
    # bridging asyncio would do for a backlog), then hand the rows over batch by batch.
    while received < expected:
        msgs = await sub.fetch(int(p["pull"]), timeout=10)
        rows = []
        for msg in msgs:
            row = json.loads(msg.data)
            row["_nats_seq"] = msg.metadata.sequence.stream
            rows.append(row)
        batches.append(rows)
        received += len(msgs)
    await nc.close()

    @dlt.resource(name="orders", write_disposition="append")
    def orders():  # type: ignore[no-untyped-def]
        yield from batches

    parts = urlsplit(p["db_url"])
    credentials = {
        "database": parts.path.lstrip("/"),
        "username": parts.username or "postgres",
        # dlt insists on a password; a server that trusts local users ignores it.
        "password": parts.password or "unused",
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
    }
    pipeline = dlt.pipeline(
        pipeline_name=f"nats_orders_{time.time_ns()}",
        destination=dlt.destinations.postgres(credentials=credentials),
        dataset_name="nats_orders",
        pipelines_dir=p.get("pipelines_dir"),
        progress=None,
    )
    pipeline.run(orders())
    seconds = time.perf_counter() - began
    return {"messages": received, "seconds": seconds}


def add_ratios(by_key: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> None:
    """``pg-cli`` against ``pg-ceiling`` (x_ceiling) and ``pg-peer`` (x_baseline), the median
    over rounds of the ratio within each round."""
    import statistics

    row = by_key.get("pg-cli")
    if row is None:
        return
    for name, reference in (("x_ceiling", "pg-ceiling"), ("x_baseline", "pg-peer")):
        ratios = [
            mine["msg_per_s"] / ref["msg_per_s"]
            for mine, ref in zip(runs.get("pg-cli", []), runs.get(reference, []), strict=False)
            if mine["msg_per_s"] and ref["msg_per_s"]
        ]
        row[name] = statistics.median(ratios) if ratios else None
        row[name + "_rounds"] = [round(x, 3) for x in ratios]


def targets(by_key: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    row = by_key.get("pg-cli", {})
    found = []
    if row.get("msg_per_s"):
        rate = row["msg_per_s"]
        found.append(
            {
                "target": "NATS -> PostgreSQL >= 100k msg/s (whole process)",
                "measured": f"{rate:,.0f} msg/s",
                "met": rate >= 100_000,
            }
        )
    if row.get("x_baseline"):
        found.append(
            {
                "target": "NATS -> PostgreSQL >= 5x the dlt peer",
                "measured": f"{row['x_baseline']:.1f}x",
                "met": row["x_baseline"] >= 5,
            }
        )
    if row.get("x_ceiling"):
        found.append(
            {
                "target": "NATS -> PostgreSQL against the bulk-load ceiling (reported)",
                "measured": f"{row['x_ceiling']:.2f}x",
                "met": True,
            }
        )
    return found
