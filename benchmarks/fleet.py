"""The fleet figures of ``python -m benchmarks.steady --fleet N``.

The fleet run is the steady-state harness (:mod:`benchmarks.steady`) with N service-mode
pipelines on one stream, one subject each; this module measures what only a fleet shows:

* **definitions load**: a fresh process that imports the project's ``definitions.py`` the way a
  code server does and builds the repository snapshot the code server serves to the daemon and
  webserver (job snapshots deferred, as a gRPC code location asks for it; the daemon fetches it
  again every minute), timed phase by phase;
* **sensor ticks**: each sensor's tick durations in the window, from the instance's tick
  records (start to end as the daemon stored them), and their sum over one round of every
  sensor of the location ("tick total");
* **run workers' memory**: summed RSS of the run processes (sampled by the harness), and once
  their USS (memory that is theirs alone: shared libraries not counted twice);
* **every pipeline's lag**: publish-to-row latency p50/p99 per pipeline, and the worst.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks import latency as lat

REPO = Path(__file__).resolve().parents[1]

_LOAD = """
import json, time, warnings
warnings.simplefilter("ignore")
began = time.perf_counter()
import dagster
from dagster._core.remote_representation.external_data import RepositorySnap
imported = time.perf_counter()
import runpy
defs = runpy.run_path({path!r})["defs"]
built = time.perf_counter()
repo = defs.get_repository_def()
jobs = repo.get_all_jobs()
resolved = time.perf_counter()
snap = RepositorySnap.from_def(repo, defer_snapshots=True)
snapped = time.perf_counter()
from dagster_shared.serdes import serialize_value
size = len(serialize_value(snap))
print(json.dumps({{
    "import_dagster_s": round(imported - began, 2),
    "build_definitions_s": round(built - imported, 2),
    "resolve_repository_s": round(resolved - built, 2),
    "repository_snapshot_s": round(snapped - resolved, 2),
    "snapshot_mb": round(size / 2**20, 2),
    "assets": len(list(repo.asset_graph.get_all_asset_keys())),
    "jobs": len(jobs),
    "sensors": len(repo.sensor_defs),
}}))
"""


def definitions_load(env: Mapping[str, str]) -> dict[str, Any]:
    """Load ``definitions.py`` under ``env`` in a fresh process, as a code server does.

    Returns the phases (import, build, resolve, snapshot), the snapshot's serialized size, what
    the location holds, and the wall time of the whole process (interpreter start included).
    """
    code = _LOAD.format(path=str(REPO / "definitions.py"))
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    wall = time.perf_counter() - began
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    return {**phases, "process_wall_s": round(wall, 2)}


def sensor_ticks(home: Path, since: datetime, until: datetime) -> dict[str, Any]:
    """Every sensor's ticks between ``since`` and ``until``, from the instance's tick records.

    ``tick_total_s`` is one round of every sensor of the location: the sum over sensors of
    their mean tick duration. ``busy_share`` is the time spent in ticks over the window (the
    daemon evaluates sensors one after another unless configured to use threads).
    """
    import dagster as dg
    from dagster._core.definitions.run_request import InstigatorType

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        per_sensor: dict[str, dict[str, Any]] = {}
        busy = 0.0
        for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
            ticks = instance.get_ticks(
                state.instigator_origin_id,
                state.selector_id,
                after=since.timestamp(),
                before=until.timestamp(),
            )
            durations = [
                t.tick_data.end_timestamp - t.timestamp
                for t in ticks
                if t.tick_data.end_timestamp is not None
            ]
            if not durations:
                continue
            busy += sum(durations)
            per_sensor[state.instigator_name] = {
                "ticks": len(durations),
                "mean_s": round(sum(durations) / len(durations), 3),
                "max_s": round(max(durations), 3),
            }
    finally:
        instance.dispose()
    window = (until - since).total_seconds()
    return {
        "sensors": len(per_sensor),
        "ticks": sum(s["ticks"] for s in per_sensor.values()),
        "tick_total_s": round(sum(s["mean_s"] for s in per_sensor.values()), 3),
        "busy_share": round(busy / window, 3) if window else None,
        "per_sensor": per_sensor,
    }


def run_worker_uss(pids: list[int]) -> float:
    """Summed USS (MB) of the given processes: what each holds alone, read once."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().uss
        except psutil.Error:
            continue
    return round(total / 2**20)


def pipeline_lags(latencies: Mapping[str, list[float]], bound: float = 2.0) -> dict[str, Any]:
    """Each pipeline's publish-to-row p50/p99, the worst of them, and how many exceed ``bound``
    at p50."""
    each = {
        name: {"p50": lat.percentile(values, 50), "p99": lat.percentile(values, 99)}
        for name, values in latencies.items()
    }
    p50s = sorted(v["p50"] for v in each.values())
    worst = max(each, key=lambda n: each[n]["p50"])
    return {
        "median_p50": lat.percentile(p50s, 50),
        "worst_p50": each[worst]["p50"],
        "worst_p50_pipeline": worst,
        "worst_p99": max(v["p99"] for v in each.values()),
        "over_bound": sum(1 for v in p50s if v > bound),
        "bound_s": bound,
        "per_pipeline": {n: {k: round(v, 3) for k, v in f.items()} for n, f in each.items()},
    }


def markdown(r: dict[str, Any]) -> list[str]:
    """The fleet section of the results' markdown."""
    f = r["fleet"]
    load, ticks, lags = f["definitions_load"], f["sensor_ticks"], f["lags"]
    gb = f["run_worker_rss_peak_mb"] / 1024
    over = lags["over_bound"]
    lag_verdict = "met" if over == 0 else f"NOT met ({over} over)"
    return [
        "",
        f"Fleet: {r['pipelines']} pipelines on one stream, {f['runs']} service run(s); "
        f"definitions: {load['assets']} assets, {load['jobs']} jobs, {load['sensors']} sensors.",
        "",
        "| figure | value | target |",
        "|---|---:|---|",
        f"| definitions load (fresh process, wall) | {load['process_wall_s']} s | |",
        f"| - import dagster / build / resolve / snapshot | {load['import_dagster_s']} / "
        f"{load['build_definitions_s']} / {load['resolve_repository_s']} / "
        f"{load['repository_snapshot_s']} s (snapshot {load['snapshot_mb']} MB) | |",
        f"| sensor tick total (one round, {ticks['sensors']} sensors) | "
        f"{ticks['tick_total_s']} s (busy {ticks['busy_share']:.1%}) | |",
        f"| run workers' RSS, summed (peak / mean) | {f['run_worker_rss_peak_mb']:,} / "
        f"{f['run_worker_rss_mean_mb']:,} MB (USS {f['run_worker_uss_mb']:,} MB) "
        f"| ≤ 4 GB: {'met' if gb <= 4 else 'NOT met'} |",
        f"| Dagster processes + run workers, cores | {r['cores']} "
        f"| ≤ 1: {'met' if r['cores'] <= 1 else 'NOT met'} |",
        f"| pipelines' lag p50: median / worst ({lags['worst_p50_pipeline']}) | "
        f"{lags['median_p50']:.2f} / {lags['worst_p50']:.2f} s "
        f"| all ≤ {lags['bound_s']:g} s: "
        f"{lag_verdict} |",
        f"| pipelines' lag p99: worst | {lags['worst_p99']:.2f} s | |",
    ]


def environment_note() -> str:
    """Load average now, for the figures' context."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
