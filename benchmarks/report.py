"""The machine a benchmark ran on, and its results as a markdown table."""

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(repo: Path, nats_server: str) -> dict[str, Any]:
    """Facts about this machine and software, for the results table and JSON."""
    try:
        server_version = subprocess.run(
            [nats_server, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        server_version = "-"
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(_mem_total_gib(), 1),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "nats_server": server_version,
        "nats_py": _version("nats-py"),
        "deltalake": _version("deltalake"),
        "pyarrow": _version("pyarrow"),
        "dagster": _version("dagster"),
        "commit": commit + ("+dirty" if dirty else ""),
    }


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: machine, settings, table, ratios, latency, targets."""
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}, "
        f"deltalake {m['deltalake']}, pyarrow {m['pyarrow']}, dagster {m['dagster']}. "
        f"Date {m['date']}, commit {m['commit']}, load average before "
        f"{' / '.join(map(str, m['load_before']))}, after "
        f"{' / '.join(map(str, results.get('load_after', [])))}.",
        "",
        f"Workload: {s['messages']:,} JSON orders of {s['size']} bytes"
        + (f" (and {s['large']:,} for the drain/memory rows)" if s["large"] else "")
        + f"; pull/fetch batch {s['batch_size']}, commit every {s['commit_rows']:,} rows; "
        f"median of {s['repeat']} run(s), each path in a fresh process"
        + (
            ""
            if s.get("bytecode") is not False
            else ", nilus_dagster without its bytecode (compiled at every start)"
        )
        + ". `timed`: `run` is the "
        "work inside the process (connect to last commit), `process` the whole process, "
        "start-up included. Peak RSS: the largest process's high-water mark; tree: the most "
        "the process tree held at once (sampled). Ratios: median over rounds of the ratio "
        "within a round; the ceiling is the faster of the two receive-only loops.",
        "",
        "| path | timed | messages | seconds | msg/s | MB/s | peak RSS MB | tree RSS MB "
        "| x ceiling | x baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["paths"]:
        lines.append(
            f"| {row['label']} | {row['timed']} | {row['messages']:,} | "
            f"{row['seconds']:.2f} | {_num(row['msg_per_s'])} | "
            f"{_num(row['mb_per_s'], '{:.1f}')} | "
            f"{_num(row['peak_rss_mb'])} | {_num(row['tree_rss_mb'])} | "
            f"{_num(row.get('x_ceiling'), '{:.2f}')} | "
            f"{_num(row.get('x_baseline'), '{:.1f}')} |"
        )
    for lat in (results.get("latency"), results.get("latency_sensor")):
        if lat:
            lines += [
                "",
                f"Latency, publish to committed row ({lat['how']}): {lat['rate']:,.0f} msg/s "
                f"for {lat['seconds']:.0f} s, {lat['rows']:,} rows over {lat['runs']} runs: "
                f"p50 {lat['p50'] * 1000:,.0f} ms, p99 {lat['p99'] * 1000:,.0f} ms, "
                f"max {lat['max'] * 1000:,.0f} ms.",
            ]
    targets = results.get("targets")
    if targets:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"
