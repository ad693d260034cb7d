"""``python -m benchmarks``: every ingestion path, side by side, on the same messages.

It starts its own ``nats-server``, publishes realistic JSON orders, then runs each path in a
fresh process (so memory peaks never mix) and reports msg/s, MB/s, peak RSS and the ratios
against the receive-only ceiling and the plain nats-py + deltalake baseline:

- ``ceiling``: a bulk pull loop that only receives (pull requests sent by hand, inbox drained
  in bulk); ``source``: the jetstream layer's own puller, receive only. The faster of the two
  is the ceiling.
- ``baseline``: nats-py ``pull_subscribe`` + ``fetch(batch_size)`` + one
  ``deltalake.write_deltalake`` append per fetched batch.
- ``engine``: ``run_pipeline`` in-process; ``cli`` and ``cli-large``: ``nilus-dagster run`` as a
  whole process (start-up included) on the main and the large backlog.
- ``dagster``: ``dagster asset materialize`` as a whole process, draining the large backlog.
- ``latency``: publish-to-committed-row latency under a steady publish rate, with the engine run
  back to back the way sensor-requested runs are; ``latency-sensor``: the same through the real
  sensor path (``dagster-daemon`` evaluating the pipeline's sensor, each run its own process).

Results go to stdout (markdown) and ``benchmarks/results/bench-<time>.json``.
"""

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import iceberg, workload
from benchmarks import latency as lat
from benchmarks import postgres as pg
from benchmarks.measure import ProcessResult, run_process
from benchmarks.report import machine, markdown

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent

MAIN_STREAM, MAIN_SUBJECT = "BENCH", "bench.orders"
LARGE_STREAM, LARGE_SUBJECT = "BENCH_LARGE", "bench.large"
LATENCY_STREAM, LATENCY_SUBJECT = "BENCH_LATENCY", "bench.latency"
SENSOR_STREAM, SENSOR_SUBJECT = "BENCH_SENSOR", "bench.sensor"
ALL_PATHS = (
    "ceiling",
    "source",
    "baseline",
    "engine",
    "cli",
    iceberg.KEY,
    "cli-large",
    "dagster",
    "latency",
    "latency-sensor",
    *pg.PATHS,
)
LATENCY_PATHS = ("latency", "latency-sensor")


@dataclass(frozen=True)
class PathSpec:
    key: str
    label: str
    timed: str  # "run": the work inside the process; "process": the whole process


SPECS = {
    "ceiling": PathSpec("ceiling", "ceiling: bulk pull, receive only (nats-py)", "run"),
    "source": PathSpec("source", "ceiling: jetstream layer puller, receive only", "run"),
    "baseline": PathSpec("baseline", "baseline: fetch() + write_deltalake per batch", "run"),
    "engine": PathSpec("engine", "engine: run_pipeline (in-process)", "run"),
    "cli": PathSpec("cli", "engine: `nilus-dagster run` (whole process)", "process"),
    iceberg.KEY: PathSpec(iceberg.KEY, iceberg.LABEL, "process"),
    "cli-large": PathSpec("cli-large", "engine: `nilus-dagster run`, large (process)", "process"),
    "dagster": PathSpec("dagster", "Dagster: `dagster asset materialize` (process)", "process"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--messages", type=int, default=200_000, help="main backlog (200000)")
    parser.add_argument("--size", type=int, default=220, help="payload bytes per order (220)")
    parser.add_argument(
        "--large",
        type=int,
        default=1_000_000,
        help="backlog for the Dagster drain and the memory check (1000000; 0: skip)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help="batch_size of the pipeline's address = the baseline's fetch size (1000)",
    )
    parser.add_argument(
        "--ceiling-pull", type=int, default=5000, help="messages per pull request of the ceiling"
    )
    parser.add_argument(
        "--commit-rows", type=int, default=100_000, help="engine commit_max_rows (100000)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the median counts")
    parser.add_argument(
        "--paths", default=",".join(ALL_PATHS), help=f"comma-separated subset of {ALL_PATHS}"
    )
    parser.add_argument("--latency-rate", type=float, default=5000, help="msg/s (5000)")
    parser.add_argument("--latency-seconds", type=float, default=20, help="publish time (20)")
    parser.add_argument(
        "--sensor-rate", type=float, default=1000, help="msg/s of the sensor-path latency (1000)"
    )
    parser.add_argument(
        "--latency-poll",
        type=float,
        default=0.1,
        help="seconds between runs that found nothing, the sensor interval stand-in (0.1)",
    )
    parser.add_argument(
        "--pg-url",
        default=pg.DEFAULT_URL,
        help="PostgreSQL server (and database to create the runs' databases from) of the "
        f"pg-* paths ({pg.DEFAULT_URL})",
    )
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="remove nilus_dagster's bytecode instead of writing it first (as pip install "
        "does), so that runs compile the package at every start under PYTHONDONTWRITEBYTECODE",
    )
    parser.add_argument("--profile", action="store_true", help="also profile the engine (cProfile)")
    parser.add_argument("--quick", action="store_true", help="smoke: a few thousand messages")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per path at most")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.large, args.repeat = min(args.messages, 3000), 0, 1
        args.batch_size, args.ceiling_pull = min(args.batch_size, 500), 500
        args.latency_rate, args.latency_seconds = 500, 2
        # The sensor path needs a daemon and a run process per tick: too slow for a smoke run.
        args.paths = ",".join(p for p in args.paths.split(",") if p.strip() != "latency-sensor")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.paths) - set(ALL_PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {ALL_PATHS}")
    if not args.large:
        args.paths = [p for p in args.paths if p != "cli-large"]
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _engine_available() -> str | None:
    try:
        for module, name in (
            ("nilus_dagster.jetstream", "JetStreamSource"),
            ("nilus_dagster.sink.delta", "DeltaSink"),
            ("nilus_dagster.engine", "run_pipeline"),
        ):
            getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        return f"the jetstream, sink or engine layer is not there yet ({exc})"
    return None


def _bytecode(write: bool) -> bool:
    """Write nilus_dagster's bytecode (``__pycache__``), as ``pip install`` does, or remove it.

    An editable install under ``PYTHONDONTWRITEBYTECODE`` (as on the machines these figures
    come from) never writes it, so every whole-process run compiled the package's modules again
    (0.07-0.09 s here), which an installed copy does not, nor any dependency or peer. Removed,
    runs measure that (Python reads bytecode it finds even when it may not write any).

    Returns:
        Whether the package has its bytecode now.
    """
    import compileall

    import nilus_dagster

    package = Path(nilus_dagster.__file__).parent
    if write:
        return bool(compileall.compile_dir(package, quiet=1))
    for cache in package.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    return False


def _dagster_available() -> str | None:
    if not (REPO / "definitions.py").exists():
        return "definitions.py is not there yet"
    return None


def _table_rows(uri: str) -> tuple[int, int, int]:
    """(rows, distinct sequences, max sequence) of a Delta table."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    if not Path(uri.removeprefix("file://"), "_delta_log").is_dir():
        return 0, 0, 0
    seqs = DeltaTable(uri).to_pyarrow_table(columns=["_nats_seq"])["_nats_seq"]
    if not len(seqs):
        return 0, 0, 0
    return len(seqs), pc.count_distinct(seqs).as_py(), pc.max(seqs).as_py()


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, hostport: str, work: Path):
        self.args = args
        self.url = url
        self.hostport = hostport
        self.work = work
        self.python = sys.executable
        self.counts: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.manifests: dict[str, Path] = {}

    # -- set-up ---------------------------------------------------------------------------

    def publish(self, stream: str, subject: str, count: int, key: str) -> None:
        asyncio.run(workload.create_stream(self.url, stream, [subject]))
        seconds = asyncio.run(workload.publish(self.url, subject, count, self.args.size))
        messages, last = asyncio.run(workload.stream_last_seq(self.url, stream))
        if messages != count or last != count:
            raise RuntimeError(f"{stream}: published {count}, the stream holds {messages}")
        self.counts[key] = count
        self.bytes[key] = sum(len(o) for o in workload.orders(0, count, self.args.size))
        self._write_manifest(key, stream, subject)
        _say(f"published {count:,} orders to {stream} in {seconds:.1f}s ({count / seconds:,.0f}/s)")

    def table_uri(self, key: str, lakehouse: Path) -> str:
        from nilus_dagster.manifest import parse_pipeline

        pipeline = parse_pipeline(self.manifests[key])
        return pipeline.table_location({"NILUS_LAKEHOUSE": str(lakehouse)}).uri

    def env(self, lakehouse: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NILUS_", "DAGSTER_"))}
        env["NILUS_LAKEHOUSE"] = str(lakehouse)
        env.update(extra)
        return env

    # -- one path, one run ----------------------------------------------------------------

    def run_child(self, name: str, params: dict[str, Any], env: dict[str, str]) -> ProcessResult:
        argv = [self.python, "-m", "benchmarks.paths", name, json.dumps(params)]
        return run_process(argv, env=env, cwd=REPO, timeout=self.args.timeout)

    def run(self, key: str, round_: int) -> dict[str, Any]:
        if key in pg.PATHS:
            return pg.run_path(self, key, round_)
        spec = SPECS[key]
        data = "large" if key in ("cli-large", "dagster") and self.args.large else "main"
        stream, subject = (
            (LARGE_STREAM, LARGE_SUBJECT) if data == "large" else (MAIN_STREAM, MAIN_SUBJECT)
        )
        expected = self.counts[data]
        lakehouse = self.work / f"lake-{key}-{round_}"
        env = self.env(lakehouse)
        uri: str | None = None
        inner: dict[str, Any] = {}
        common = {"url": self.url, "stream": stream, "subject": subject, "count": expected}
        if key == "ceiling":
            proc = self.run_child("ceiling", {**common, "pull": self.args.ceiling_pull}, env)
        elif key == "source":
            proc = self.run_child("source", {"manifest": str(self.manifests[data])}, env)
        elif key == "baseline":
            uri = str(lakehouse / "baseline" / "orders")
            params = {**common, "pull": self.args.batch_size, "table_uri": uri}
            proc = self.run_child("baseline", params, env)
        elif key == "engine":
            uri = self.table_uri(data, lakehouse)
            proc = self.run_child("engine", {"manifest": str(self.manifests[data])}, env)
        elif key in ("cli", "cli-large", iceberg.KEY):
            if key == iceberg.KEY:
                env = iceberg.env(env, lakehouse)
            else:
                uri = self.table_uri(data, lakehouse)
            argv = [str(BIN / "nilus-dagster"), "run", str(self.manifests[data]), "--drain"]
            proc = run_process(argv, env=env, cwd=REPO, timeout=self.args.timeout)
        elif key == "dagster":
            uri = self.table_uri(data, lakehouse)
            home = self.work / f"dagster-home-{round_}"
            home.mkdir(parents=True, exist_ok=True)
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
            argv = [
                str(BIN / "dagster"),
                "asset",
                "materialize",
                "--select",
                f"bench_{data}",
                "-f",
                str(REPO / "definitions.py"),
            ]
            env = self.env(
                lakehouse, NILUS_PIPELINES=str(self.manifests[data]), DAGSTER_HOME=str(home)
            )
            proc = run_process(argv, env=env, cwd=REPO, timeout=self.args.timeout)
        else:
            raise ValueError(key)

        error = None
        if proc.returncode != 0:
            error = f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"
        elif spec.timed == "run":
            try:
                inner = json.loads(proc.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                error = f"no result line in output: {proc.stdout[-500:]} {proc.stderr[-1500:]}"
        if key == iceberg.KEY:
            uri, rows, distinct, top = iceberg.table_rows(self.manifests[data], env)
        elif uri is not None:
            rows, distinct, top = _table_rows(uri)
        if uri is not None:
            rows_ok = rows == distinct == expected and top == expected
            messages = rows
        else:
            messages = int(inner.get("messages", 0))
            rows_ok = messages == expected and inner.get("last_seq") == expected
        if not rows_ok and error is None:
            error = f"expected {expected} rows/messages, got {messages}"
        seconds = float(inner["seconds"]) if spec.timed == "run" and inner else proc.wall_seconds
        nbytes = self.bytes[data] if rows_ok else int(inner.get("bytes", 0))
        result = {
            "key": key,
            "label": spec.label,
            "timed": "run" if spec.timed == "run" else "process",
            "data": data,
            "messages": messages,
            "expected": expected,
            "rows_ok": rows_ok,
            "seconds": seconds,
            "wall_seconds": proc.wall_seconds,
            "msg_per_s": messages / seconds if seconds and rows_ok else None,
            "mb_per_s": nbytes / 1e6 / seconds if seconds and rows_ok else None,
            "peak_rss_mb": proc.max_rss_bytes / 1e6,
            "tree_rss_mb": proc.tree_rss_bytes / 1e6,
            "inner": inner,
            "error": error,
        }
        if key == "dagster" or key.startswith("cli"):
            result["inner"] = {"stdout_tail": proc.stdout[-1500:]}
        shutil.rmtree(lakehouse, ignore_errors=True)
        return result

    # -- latency --------------------------------------------------------------------------

    def _latency_table(self, key: str, stream: str, subject: str, **manifest: Any) -> str:
        """A stream with one warm-up message, and the pipeline over it; its table's URI."""
        asyncio.run(workload.create_stream(self.url, stream, [subject]))
        asyncio.run(workload.publish(self.url, subject, 1, self.args.size))
        self._write_manifest(key, stream, subject, **manifest)
        return self.table_uri(key, self.work / f"lake-{key}")

    def _write_manifest(self, key: str, stream: str, subject: str, **manifest: Any) -> None:
        """The pipeline ``bench_<key>`` over ``subject``, with this run's pull and commit sizes."""
        self.manifests[key] = workload.write_manifest(
            self.work / f"{key}.yaml",
            name=f"bench_{key.replace('-', '_')}",
            hostport=self.hostport,
            stream=stream,
            subject=subject,
            batch_size=self.args.batch_size,
            commit_rows=self.args.commit_rows,
            **manifest,
        )

    def _latency_result(
        self, key: str, uri: str, sent: int, rate: float, seconds: float, runs: int, how: str
    ) -> dict[str, Any]:
        from nilus_dagster.manifest import parse_pipeline

        app_id = parse_pipeline(self.manifests[key]).app_id
        values = lat.row_latencies(uri, app_id, skip_until=1)
        rows, distinct, top = _table_rows(uri)
        return {
            "how": how,
            "rate": rate,
            "seconds": seconds,
            "rows": len(values),
            "rows_ok": rows == distinct == 1 + sent and top == 1 + sent,
            "runs": runs,
            "p50": lat.percentile(values, 50),
            "p99": lat.percentile(values, 99),
            "max": max(values) if values else float("nan"),
        }

    def sensor_latency(self) -> dict[str, Any]:
        """Latency through ``dagster-daemon``: the pipeline's sensor requests each run."""
        args = self.args
        key = "latency-sensor"
        uri = self._latency_table(key, SENSOR_STREAM, SENSOR_SUBJECT, sensor_interval=1)
        home = self.work / "dagster-home-sensor"
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = self.env(
            self.work / f"lake-{key}",
            NILUS_PIPELINES=str(self.manifests[key]),
            DAGSTER_HOME=str(home),
        )
        log = open(self.work / "dagster-daemon.log", "wb")  # noqa: SIM115 (the daemon's)
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-f", str(REPO / "definitions.py")],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if not lat.wait_for_commit(uri, 1, timeout=180):
                raise RuntimeError("no sensor-requested run committed within 180 s")
            sent, rate = asyncio.run(
                lat.publish_steady(
                    self.url, SENSOR_SUBJECT, args.sensor_rate, args.latency_seconds, args.size, 1
                )
            )
            if not lat.wait_for_commit(uri, 1 + sent, timeout=300):
                raise RuntimeError("the sensor-requested runs did not catch up within 300 s")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(10)
            log.close()
        runs = len(lat.commit_times(uri)) - 1  # the warm-up run's commit aside
        how = (
            "sensor path: `dagster-daemon` evaluating the pipeline's sensor (minimum interval "
            "1 s; the daemon evaluates sensors about every 5 s), each requested run launched as "
            "its own process"
        )
        return self._latency_result(key, uri, sent, rate, args.latency_seconds, runs, how)

    def latency(self) -> dict[str, Any]:
        """Latency with the engine run back to back in one process (no Dagster)."""
        args = self.args
        uri = self._latency_table("latency", LATENCY_STREAM, LATENCY_SUBJECT)
        lakehouse = self.work / "lake-latency"
        stop = self.work / "latency.stop"
        params = {
            "manifest": str(self.manifests["latency"]),
            "stop_file": str(stop),
            "poll": args.latency_poll,
        }
        holder: dict[str, ProcessResult] = {}
        loop = threading.Thread(
            target=lambda: holder.setdefault(
                "proc", self.run_child("engine_loop", params, self.env(lakehouse))
            )
        )
        loop.start()
        if not lat.wait_for_commit(uri, 1, timeout=120):
            stop.write_text("1")
            loop.join(args.timeout)
            proc = holder.get("proc")
            raise RuntimeError(f"the engine loop never committed: {proc and proc.stderr[-2000:]}")
        sent, rate = asyncio.run(
            lat.publish_steady(
                self.url, LATENCY_SUBJECT, args.latency_rate, args.latency_seconds, args.size, 1
            )
        )
        stop.write_text(str(1 + sent))
        loop.join(args.timeout)
        proc = holder["proc"]
        if proc.returncode != 0:
            raise RuntimeError(f"the engine loop failed: {proc.stderr[-2000:]}")
        inner = json.loads(proc.stdout.strip().splitlines()[-1])
        how = (
            f"engine run back to back in one process, {args.latency_poll:g} s pause after a run "
            "that found nothing: what the engine adds, without Dagster's tick and run launch"
        )
        return self._latency_result(
            "latency", uri, sent, rate, args.latency_seconds, inner["runs"], how
        )


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if r["msg_per_s"] is not None]
    if not good:
        return runs[-1]
    ordered = sorted(good, key=lambda r: r["msg_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_msg_per_s"] = [round(r["msg_per_s"]) for r in good]
    chosen["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    chosen["tree_rss_mb"] = max(r["tree_rss_mb"] for r in runs)
    chosen["rows_ok"] = all(r["rows_ok"] for r in runs)
    return chosen


def _rate(runs: dict[str, list[dict[str, Any]]], key: str, round_: int) -> float | None:
    done = runs.get(key, [])
    return done[round_]["msg_per_s"] if round_ < len(done) else None


def _add_ratios(
    by_key: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]], rounds: int
) -> None:
    """``x_ceiling``, ``x_baseline`` (and ``x_raw``, ``x_puller``: against each receive-only
    loop alone) of every path: the median over rounds of the ratio within each round, since the
    runs of one round are close in time and so see about the same load from whatever else the
    machine is doing."""
    for key, row in by_key.items():
        if key in pg.PATHS:
            continue  # against the PostgreSQL ceiling and peer: pg.add_ratios
        for name, references in (
            ("x_ceiling", ("ceiling", "source")),
            ("x_baseline", ("baseline",)),
            ("x_raw", ("ceiling",)),
            ("x_puller", ("source",)),
        ):
            if key in references or key in ("ceiling", "source"):
                continue
            ratios = []
            for r in range(rounds):
                mine = _rate(runs, key, r)
                ref = max((x for x in (_rate(runs, k, r) for k in references) if x), default=None)
                if mine and ref:
                    ratios.append(mine / ref)
            row[name] = statistics.median(ratios) if ratios else None
            row[name + "_rounds"] = [round(x, 3) for x in ratios]


def _targets(by_key: dict[str, dict[str, Any]]) -> list[dict]:
    targets = []
    engine = by_key.get("engine", {})
    rate = engine.get("msg_per_s")
    x_ceiling, x_baseline = engine.get("x_ceiling"), engine.get("x_baseline")
    if rate:
        targets.append(
            {
                "target": "engine >= 100k msg/s",
                "measured": f"{rate:,.0f} msg/s",
                "met": rate >= 100_000,
            }
        )
    if x_ceiling:
        parts = [f"{x_ceiling:.2f}x"]
        if engine.get("x_raw") and engine.get("x_puller"):
            parts.append(
                f"(raw loop {engine['x_raw']:.2f}x, jetstream puller {engine['x_puller']:.2f}x)"
            )
        targets.append(
            {
                "target": "engine >= 0.8x ceiling",
                "measured": " ".join(parts),
                "met": x_ceiling >= 0.8,
            }
        )
    if x_baseline:
        targets.append(
            {
                "target": "engine >= 4x baseline",
                "measured": f"{x_baseline:.1f}x",
                "met": x_baseline >= 4,
            }
        )
    dag = by_key.get("dagster", {})
    if dag.get("msg_per_s"):
        targets.append(
            {
                "target": f"Dagster drain of {dag['messages']:,} >= 80k msg/s incl. start-up",
                "measured": f"{dag['msg_per_s']:,.0f} msg/s",
                "met": dag["msg_per_s"] >= 80_000,
            }
        )
    small, big = by_key.get("cli", {}), by_key.get("cli-large", {})
    if small.get("rows_ok") and big.get("rows_ok"):
        ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
        targets.append(
            {
                "target": f"peak RSS bounded: {big['messages']:,} vs {small['messages']:,} "
                "messages within 1.25x",
                "measured": f"{big['peak_rss_mb']:.0f} MB vs {small['peak_rss_mb']:.0f} MB "
                f"({ratio:.2f}x)",
                "met": ratio <= 1.25,
            }
        )
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nilus_dagster.jetstream.local_server import LocalNatsServer

    skipped: dict[str, str] = {}
    missing_engine = _engine_available()
    missing_dagster = _dagster_available()
    for key in args.paths:
        if missing_engine and key not in ("ceiling", "baseline"):
            skipped[key] = missing_engine
        elif missing_dagster and key in ("dagster", "latency-sensor"):
            skipped[key] = missing_dagster
    paths = [p for p in args.paths if p not in skipped]
    bytecode = None if missing_engine else _bytecode(write=not args.no_bytecode)
    load = os.getloadavg()[0]
    if load > 0.5:
        _say(f"note: load average {load:.2f} before the run; ratios hold, absolute figures less")

    work = Path(tempfile.mkdtemp(prefix="nilus-bench-"))
    server = LocalNatsServer(store_dir=work / "nats")
    info = machine(REPO, server.binary)
    failed = False
    try:
        server.start()
        bench = Bench(args, server.url, server.hostport, work)
        bench.publish(MAIN_STREAM, MAIN_SUBJECT, args.messages, "main")
        if args.large and any(p in paths for p in ("cli-large", "dagster")):
            bench.publish(LARGE_STREAM, LARGE_SUBJECT, args.large, "large")
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(1, args.repeat + 1):
            for key in paths:
                if key in LATENCY_PATHS:
                    continue
                result = bench.run(key, round_)
                runs.setdefault(key, []).append(result)
                shown = f"{result['msg_per_s']:,.0f} msg/s" if result["msg_per_s"] else "FAILED"
                _say(
                    f"[{round_}/{args.repeat}] {key:9} {shown:>14}  {result['seconds']:6.2f}s  "
                    f"peak RSS {result['peak_rss_mb']:.0f} MB"
                    + (f"  error: {result['error']}" if result["error"] else "")
                )
        if args.profile and not missing_engine:
            profile = args.out / "engine-profile.pstats"
            args.out.mkdir(parents=True, exist_ok=True)
            env = bench.env(work / "lake-profile")
            proc = bench.run_child(
                "engine_profile",
                {"manifest": str(bench.manifests["main"]), "profile": str(profile)},
                env,
            )
            _say(f"profile: {profile}.txt (exit {proc.returncode})")
        latencies: dict[str, Any] = {}
        for key, measure in (("latency", bench.latency), ("latency-sensor", bench.sensor_latency)):
            if key not in paths:
                continue
            try:
                latencies[key] = found = measure()
                p50, p99 = found["p50"] * 1000, found["p99"] * 1000
                _say(f"{key}: p50 {p50:.0f} ms p99 {p99:.0f} ms")
                failed = failed or not found["rows_ok"]
            except Exception as exc:  # report it with the other results
                failed = True
                _say(f"{key} FAILED: {exc}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    by_key = {key: _median_run(r) for key, r in runs.items()}
    _add_ratios(by_key, runs, args.repeat)
    pg.add_ratios(by_key, runs)
    iceberg.add_delta_ratio(by_key, runs, args.repeat)
    for row in by_key.values():
        failed = failed or not row["rows_ok"] or bool(row["error"])
    results = {
        "machine": info,
        "settings": {
            "messages": args.messages,
            "large": args.large if any(k in by_key for k in ("cli-large", "dagster")) else 0,
            "size": args.size,
            "batch_size": args.batch_size,
            "ceiling_pull": args.ceiling_pull,
            "commit_rows": args.commit_rows,
            "repeat": args.repeat,
            "bytecode": bytecode,
        },
        "paths": [by_key[k] for k in ALL_PATHS if k in by_key],
        "skipped": skipped,
        "latency": latencies.get("latency"),
        "latency_sensor": latencies.get("latency-sensor"),
        "targets": _targets(by_key) + pg.targets(by_key) + iceberg.targets(by_key),
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "ok": not failed,
    }
    table = markdown(results)
    print(table)
    for key, why in skipped.items():
        print(f"skipped {key}: {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / f"bench-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    (args.out / f"bench-{stamp}.md").write_text(table)
    print(f"results: {out}")
    if failed:
        return 1
    if args.strict and not all(t["met"] for t in results["targets"]):
        return 2
    return 0
