"""Steady state through Dagster: per-tick runs against a service run, side by side.

``python -m benchmarks.steady`` runs, for each mode (``--modes per_tick,service``), a real
``dagster dev`` (webserver, daemon, code server, run workers) on an instance stored in a fresh
database of the machine's PostgreSQL, one or more pipelines (``--pipelines``) each fed by a
publisher at ``--rate`` msg/s for ``--seconds``, and reports per mode:

* CPU-seconds per million messages of every process in ``dagster dev``'s tree (webserver,
  daemon, code server, run workers; nats-server and the publisher are not in it), sampled with
  psutil every 0.2 s from the first published message until the last is committed. A process is
  counted from the sample before it appears to its last sample, so a short-lived run worker's
  last 0.2 s may be missed: per-tick mode is, if anything, under-counted.
* publish-to-row latency p50/p99 (the Delta log entry's time minus ``_nats_timestamp``).
* runs per pipeline-hour: each run weighted by the share of its life inside the window (a
  service run that lives ``run_seconds`` counts window/``run_seconds``).
* event-log rows per pipeline-hour (``event_logs`` rows stored in the window, by id).

Every table is checked: each published sequence exactly once. Results go to
``benchmarks/results/steady-<time>.json`` and ``.md``.

``--fleet N`` is the fleet measurement: N service-mode pipelines on one stream, one subject
each, ``--rate-per-pipeline`` msg/s each (5), supervisors at their default interval; it adds the
definitions load time, the sensor tick total, the run workers' summed RSS and every pipeline's
lag (:mod:`benchmarks.fleet`).
"""

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import fleet
from benchmarks import latency as lat
from benchmarks.tree import TreeCpu, stop_dev
from benchmarks.workload import create_stream, orders
from nilus_dagster.jetstream.local_server import LocalNatsServer, free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DAGSTER_DEV = [sys.executable, "-m", "dagster", "dev", "-w"]
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


def _manifest(folder: Path, name: str, url: str, stream: str, mode: str, args: Any) -> Path:
    path = folder / f"{name}.yaml"
    # The per-tick sensor's interval bounds its latency; a supervisor only needs to notice a
    # dead run, so service mode keeps its own (the manifests' default unless asked).
    interval = args.sensor_interval if mode == "per_tick" else args.supervisor_interval
    extra = f", max_pipelines: {args.max_pipelines}" if args.max_pipelines else ""
    extra += f", poll_seconds: {args.poll_seconds}" if args.poll_seconds else ""
    path.write_text(
        textwrap.dedent(
            f"""\
            name: {name}
            spec:
              type: stream
              source:
                address: nats+jetstream://{url}?subject={stream}.{name}&batch_size=1000&timeout=1
                options: {{source_table: {stream}, run_in_loop: true}}
              sink:
                address: dataos://lake?purpose=rw
                options: {{dest_table: bench.{name.replace("-", "_")}}}
              dagster:
                partitions: none
                run_mode: {mode}
                service: {{run_seconds: {args.run_seconds}, report_every_seconds: 60{extra}}}
            """
        )
        + (f"    sensor_interval_seconds: {interval}\n" if interval else "")
    )
    return path


def _dagster_home(folder: Path, postgres_url: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "dagster.yaml").write_text(
        textwrap.dedent(
            f"""\
            telemetry: {{enabled: false}}
            storage:
              postgres:
                postgres_url: {postgres_url}
            run_coordinator:
              module: dagster._core.run_coordinator
              class: QueuedRunCoordinator
              config: {{dequeue_interval_seconds: 1}}
            run_monitoring: {{enabled: true, poll_interval_seconds: 30}}
            concurrency:
              pools: {{default_limit: 1}}
            """
        )
    )
    import dagster as dg

    dg.DagsterInstance.from_config(str(folder)).dispose()
    return folder


@contextlib.contextmanager
def _database() -> Any:
    import psycopg2

    admin = psycopg2.connect(connect_timeout=3, **PG_ADMIN)
    admin.autocommit = True
    name = f"nilus_steady_{secrets.token_hex(4)}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _max_event_id(db: str) -> int:
    """The newest event-log row's id (rows are counted by id, not by their timestamps)."""
    import psycopg2

    with psycopg2.connect(**{**PG_ADMIN, "dbname": db}) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT coalesce(max(id), 0) FROM event_logs")
        return int(cursor.fetchone()[0])


def _runs_started(db: str) -> int:
    """How many runs are running now."""
    import psycopg2

    with psycopg2.connect(**{**PG_ADMIN, "dbname": db}) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE status = 'STARTED'")
        return int(cursor.fetchone()[0])


def _run_weights(db: str, since: datetime, until: datetime, run_seconds: float | None) -> float:
    """Runs in the window, each weighted by the share of its life inside the window.

    A service run (``run_seconds`` given) still running at the window's end, or ended after
    it (by this benchmark stopping ``dagster dev``), is taken to live ``run_seconds``.
    """
    import psycopg2

    with psycopg2.connect(**{**PG_ADMIN, "dbname": db}) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT start_time, end_time FROM runs WHERE start_time IS NOT NULL")
        rows = cursor.fetchall()
    lo, hi = since.timestamp(), until.timestamp()
    total = 0.0
    for start, end in rows:
        cut_short = end is None or (run_seconds is not None and end > hi)
        life_end = max(hi, start + (run_seconds or 0.0)) if cut_short else end
        life = max(life_end - start, 1e-9)
        overlap = max(0.0, min(hi, life_end) - max(lo, start))
        total += overlap / life
    return total


def run_mode(mode: str, args: Any, work: Path, server: LocalNatsServer) -> dict[str, Any]:
    """One mode, start to finish: returns its figures."""
    folder = work / mode
    (folder / "pipelines").mkdir(parents=True)
    stream = f"STEADY_{mode.upper()}"
    names = [f"steady-{i:03d}" for i in range(args.pipelines)]
    asyncio.run(create_stream(server.url, stream, [f"{stream}.>"]))
    for name in names:
        _manifest(folder / "pipelines", name, server.hostport, stream, mode, args)
    lakehouse = folder / "lakehouse"
    uris = {n: str(lakehouse / "lake" / "bench" / n.replace("-", "_")) for n in names}
    with _database() as db:
        home = _dagster_home(folder / "home", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}")
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "NILUS_PIPELINES": str(folder / "pipelines"),
            "NILUS_LAKEHOUSE": str(lakehouse),
            "PYTHONUNBUFFERED": "1",
        }
        log = (folder / "dagster-dev.log").open("wb")
        dev = subprocess.Popen(
            [*DAGSTER_DEV, str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(free_port())],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if args.fleet:
            # Before `dagster dev` starts: the load has the machine to itself.
            load = fleet.definitions_load(env)
            print(f"definitions load: {json.dumps(load)}", flush=True)
        try:
            warm = asyncio.run(_publish_each(server.url, stream, names, 1))
            for name in names:
                if not lat.wait_for_commit(uris[name], warm[name], timeout=240):
                    raise RuntimeError(f"{mode}: {name} did not commit its first message")
            cpu = TreeCpu(dev.pid)
            first_event = _max_event_id(db)
            since = datetime.now(timezone.utc)
            cpu.start()
            sent = asyncio.run(
                _publish_all(server.url, stream, names, args.rate, args.seconds, args.size)
            )
            for name in names:
                if not lat.wait_for_commit(uris[name], sent[name][-1], timeout=300):
                    raise RuntimeError(f"{mode}: {name} did not catch up within 300 s")
            uss = fleet.run_worker_uss(cpu.pids("run worker")) if args.fleet else 0
            cpu_seconds = cpu.stop()
            until = datetime.now(timezone.utc)
            event_rows = _max_event_id(db) - first_event
            alive = _runs_started(db)
        finally:
            stop_dev(dev)
            log.close()
        hours = (until - since).total_seconds() / 3600
        pipeline_hours = hours * len(names)
        runs = _run_weights(db, since, until, args.run_seconds if mode == "service" else None)
        ticks = fleet.sensor_ticks(home, since, until) if args.fleet else None
    latencies: list[float] = []
    each: dict[str, list[float]] = {}
    exact = True
    messages = 0
    for name in names:
        each[name] = lat.row_latencies(uris[name], f"nilus-dagster/{name}", skip_until=warm[name])
        latencies += each[name]
        rows = _table_seqs(uris[name])
        expected = [warm[name], *sent[name]]
        exact &= sorted(rows) == expected
        messages += len(sent[name])
    result = {
        "mode": mode,
        "pipelines": len(names),
        "messages": messages,
        "window_seconds": round(hours * 3600, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "cpu_by_process": cpu.by_kind(),
        "cpu_per_million": round(cpu_seconds / messages * 1e6, 1),
        "cores": round(cpu_seconds / (hours * 3600), 3),
        "peak_tree_rss_mb": round(cpu.peak_rss / 2**20),
        "p50": lat.percentile(latencies, 50),
        "p99": lat.percentile(latencies, 99),
        "runs_per_pipeline_hour": round(runs / pipeline_hours, 2),
        "event_rows_per_pipeline_hour": round(event_rows / pipeline_hours),
        "exactly_once": exact,
    }
    if args.fleet:
        peak, mean = cpu.rss_mb("run worker")
        result["fleet"] = {
            "definitions_load": load,
            "sensor_ticks": ticks,
            "runs": alive,
            "run_worker_rss_peak_mb": peak,
            "run_worker_rss_mean_mb": mean,
            "run_worker_uss_mb": uss,
            "lags": fleet.pipeline_lags(each),
        }
    return result


async def _publish_each(url: str, stream: str, names: list[str], count: int) -> dict[str, int]:
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        last = {}
        for name in names:
            for i in range(count):
                ack = await js.publish(f"{stream}.{name}", json.dumps({"warm": i}).encode())
                last[name] = ack.seq
        return last
    finally:
        await nc.close()


async def _publish_all(
    url: str, stream: str, names: list[str], rate: float, seconds: float, size: int
) -> dict[str, list[int]]:
    """``rate`` msg/s in total, round-robin over the pipelines' subjects; their sequences."""
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(publish_async_max_pending=20_000)
        total = int(rate * seconds)
        payloads = orders(1, total + 1, size)
        futures: dict[str, list[Any]] = {n: [] for n in names}
        sent = 0
        began = time.perf_counter()
        while sent < total:
            due = min(total, int((time.perf_counter() - began) * rate))
            while sent < due:
                name = names[sent % len(names)]
                futures[name].append(await js.publish_async(f"{stream}.{name}", next(payloads)))
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.wait_for(js.publish_async_completed(), timeout=120)
        return {n: [f.result().seq for f in fs] for n, fs in futures.items()}
    finally:
        await nc.close()


def _table_seqs(uri: str) -> list[int]:
    from deltalake import DeltaTable

    return DeltaTable(uri).to_pyarrow_table(columns=["_nats_seq"])["_nats_seq"].to_pylist()


def _markdown(results: list[dict[str, Any]], args: Any) -> str:
    def interval(seconds: int | None) -> str:
        return f"{seconds} s" if seconds else "as in the manifests"

    lines = [
        f"Steady state: {args.pipelines} pipeline(s), {args.rate:g} msg/s in total for "
        f"{args.seconds:g} s, `dagster dev` on PostgreSQL; per-tick sensor interval "
        f"{interval(args.sensor_interval)}, supervisor interval "
        f"{interval(args.supervisor_interval)}, "
        f"service runs of {args.run_seconds:g} s"
        + (f", at most {args.max_pipelines} pipelines a run." if args.max_pipelines else "."),
        "",
        "| mode | messages | CPU s | CPU s / 1M msg | cores | p50 s | p99 s | runs / pipeline-h "
        "| event-log rows / pipeline-h | exactly once |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['messages']:,} | {r['cpu_seconds']} | {r['cpu_per_million']:,} "
            f"| {r['cores']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['runs_per_pipeline_hour']} "
            f"| {r['event_rows_per_pipeline_hour']:,} | {r['exactly_once']} |"
        )
    by = {r["mode"]: r for r in results}
    if "per_tick" in by and "service" in by:
        tick, svc = by["per_tick"], by["service"]
        cpu = svc["cpu_per_million"] / tick["cpu_per_million"]
        rows = svc["event_rows_per_pipeline_hour"] / max(1, tick["event_rows_per_pipeline_hour"])
        lines += ["", f"service / per-tick: CPU per message {cpu:.3f}, event-log rows {rows:.3f}"]
    for r in results:
        if "fleet" in r:
            lines += fleet.markdown(r)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steady", description=__doc__)
    parser.add_argument("--modes", default="per_tick,service")
    parser.add_argument("--rate", type=float, default=1000.0, help="msg/s in total")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--pipelines", type=int, default=1)
    parser.add_argument("--size", type=int, default=220)
    parser.add_argument(
        "--sensor-interval",
        type=int,
        default=None,
        help="spec.dagster.sensor_interval_seconds of per-tick pipelines (default 1; with "
        "--fleet, the manifests')",
    )
    parser.add_argument(
        "--supervisor-interval",
        type=int,
        default=None,
        help="spec.dagster.sensor_interval_seconds of service pipelines, the supervisor's "
        "(default: the manifests' default, 10)",
    )
    parser.add_argument("--run-seconds", type=float, default=3600.0)
    parser.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="N service-mode pipelines on one stream, one subject each, --rate-per-pipeline "
        "msg/s each; adds definitions load time, sensor ticks, run workers' memory and every "
        "pipeline's lag",
    )
    parser.add_argument("--rate-per-pipeline", type=float, default=5.0)
    parser.add_argument(
        "--max-pipelines",
        type=int,
        default=None,
        help="spec.dagster.service.max_pipelines (default: the manifests' default)",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=None,
        help="spec.dagster.service.poll_seconds (default: the manifests' default, 1)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (tables, the Dagster instance's logs) for inspection",
    )
    args = parser.parse_args(argv)
    if args.fleet:
        args.modes, args.pipelines = "service", args.fleet
        args.rate = args.fleet * args.rate_per_pipeline
    elif args.sensor_interval is None:
        args.sensor_interval = 1
    work = Path(tempfile.mkdtemp(prefix="nilus-steady-"))
    server = LocalNatsServer().start()
    results = []
    try:
        for mode in args.modes.split(","):
            result = run_mode(mode.strip(), args, work, server)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        server.stop()
        if args.keep:
            print(f"tables, instance and logs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)  # a fleet's folder holds hundreds of MB
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = _markdown(results, args)
    (RESULTS / f"steady-{stamp}.md").write_text(text)
    (RESULTS / f"steady-{stamp}.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0 if all(r["exactly_once"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
