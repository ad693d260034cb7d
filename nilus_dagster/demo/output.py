"""What the demo prints and prepares.

The table's newest rows, a run's summary and the commands that show the same pipeline in
``dagster dev``.
"""

import contextlib
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nilus_dagster.demo.sample import DEMO_PORT
from nilus_dagster.engine.settings import SERVERS_ENV
from nilus_dagster.errors import NilusError
from nilus_dagster.manifest.depots import DEAD_LETTER_SUFFIX, LAKEHOUSE_ENV, TableLocation
from nilus_dagster.manifest.loader import PIPELINES_ENV, Pipeline

if TYPE_CHECKING:
    from nilus_dagster.engine.report import RunReport


_SHOWN_COLUMNS = ("_nats_seq", "order_id", "customer_id", "status", "amount", "_nats_timestamp")
_SHOWN_ROWS = 5


# --- the table ----------------------------------------------------------------------------------


def reset_table(location: TableLocation) -> bool:
    """Delete the demo's table and its dead-letter table (local folders only)."""
    if not location.is_local:
        raise NilusError(
            f"the demo table {location.uri} is not on the local disk (NILUS_DEPOTS points the "
            "orders-lakehouse depot elsewhere); the demo only deletes local tables: delete it "
            "yourself, or unset NILUS_DEPOTS"
        )
    removed = False
    for uri in (location.uri, location.sibling(DEAD_LETTER_SUFFIX).uri):
        path = Path(uri.removeprefix("file://"))
        if path.exists():
            shutil.rmtree(path)
            removed = True
    return removed


def last_rows(location: TableLocation, after: int) -> list[dict[str, object]]:
    """The table's rows with a stream sequence above ``after``, oldest first."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    table = DeltaTable(location.uri, storage_options=dict(location.storage_options) or None)
    dataset = table.to_pyarrow_dataset()
    columns = [c for c in _SHOWN_COLUMNS if c in dataset.schema.names]
    rows = dataset.to_table(columns=columns, filter=pc.field("_nats_seq") > after)
    return rows.sort_by("_nats_seq").to_pylist()


def format_rows(rows: list[dict[str, object]]) -> list[str]:
    """A small text table."""
    if not rows:
        return []

    def cell(value: object) -> str:
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        if isinstance(value, float):
            return f"{value:.2f}"
        return "" if value is None else str(value)

    names = list(rows[0])
    cells = [[cell(row[name]) for name in names] for row in rows]
    widths = [max(len(name), *(len(r[i]) for r in cells)) for i, name in enumerate(names)]
    lines = ["  ".join(name.ljust(w) for name, w in zip(names, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return [line.rstrip() for line in lines]


def run_summary(name: str, report: "RunReport", location: TableLocation) -> list[str]:
    """What a run wrote: its figures and the table's newest rows."""
    lag_seconds = f"{report.lag_seconds:.1f}" if report.lag_seconds is not None else "-"
    lines = [
        f"ran {name} once through the engine:",
        f"  rows written     {report.rows_written} ({report.dead_letters} dead letters)",
        f"  committed        sequences {report.first_seq}..{report.last_seq}",
        f"  position         {report.position} (stream last sequence {report.stream_last_seq})",
        f"  sequence lag     {report.sequence_lag}",
        f"  lag seconds      {lag_seconds}",
        f"  took             {report.duration_seconds:.2f}s",
        f"  table            {location.uri} ({report.row_count} rows)",
    ]
    rows = last_rows(location, max(0, report.position - _SHOWN_ROWS))
    if rows:
        lines += ["", f"the last {len(rows)} rows:"]
        lines += [f"  {line}" for line in format_rows(rows)]
    return lines


# --- what to run next ---------------------------------------------------------------------------


def checkout_root() -> Path | None:
    """The project checkout this package runs from (an editable install), if any."""
    root = Path(__file__).resolve().parents[2]  # nilus_dagster/demo/output.py
    return root if (root / "definitions.py").is_file() else None


def shown_path(path: Path, base: Path | None) -> str:
    """``path`` relative to ``base`` when it is inside it, else absolute."""
    path = path.resolve()
    if base is not None:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(base.resolve()))
    return str(path)


DAGSTER_HOME_FOLDER = ".dagster_home"


def prepare_dagster_home(project: Path | None) -> bool:
    """Create the project's ``.dagster_home`` with its SQLite storage, if not there yet.

    ``dagster dev`` starts the webserver and the daemon at once, and on a fresh home both create
    the schedule database: one of them can fail with "table alembic_version already exists"
    (seen in about 1 start in 4 on a busy 2-core machine), which leaves a UI that never comes
    up. Creating the storage here, once, leaves them nothing to race for.

    Returns:
        Whether the folder is ready (``False`` when the project folder is unknown).
    """
    if project is None:
        return False
    home = project / DAGSTER_HOME_FOLDER
    if (home / "schedules").is_dir() and (home / "history").is_dir():
        return True
    home.mkdir(parents=True, exist_ok=True)
    from dagster import DagsterInstance  # only here: the rest of the demo needs no Dagster

    DagsterInstance.from_config(str(home)).dispose()
    return True


def next_steps(
    pipeline: Pipeline, port: int, *, keep_running: bool, home_ready: bool = False
) -> list[str]:
    """The commands that show this pipeline live in ``dagster dev``.

    ``NILUS_PIPELINES`` limits Dagster to the sample pipeline: the other examples in
    ``pipelines/`` point at ``nats.prod`` and need secrets, so they would only show failures.
    ``DAGSTER_HOME`` keeps Dagster's history across restarts and lets CLI runs (backfills) show
    in the UI.
    """
    cwd = Path.cwd().resolve()
    root = checkout_root()
    at_root = root is not None and root == cwd
    base = cwd if at_root else None
    venv_bin = Path(sys.executable).parent
    env = [
        f"{SERVERS_ENV}=nats://127.0.0.1:{port}",
        f"{PIPELINES_ENV}={shown_path(pipeline.path, base)}",
    ]
    lakehouse = os.environ.get(LAKEHOUSE_ENV)
    if lakehouse or not at_root:
        # Dagster must read the table this run wrote, wherever it starts.
        env.append(f"{LAKEHOUSE_ENV}={shown_path(cwd / (lakehouse or '.lakehouse'), base)}")
    env.append(f"DAGSTER_HOME=$PWD/{DAGSTER_HOME_FOLDER}")
    dev = f"{shown_path(venv_bin / 'dagster', base)} dev"
    if not home_ready:
        dev = f"mkdir -p {DAGSTER_HOME_FOLDER} && {dev}"
    demo = f"{shown_path(venv_bin / 'nilus-dagster', base)} demo --keep-running"
    if port != DEMO_PORT:
        demo += f" --port {port}"
    lines = ["Watch it live in Dagster:"]
    if keep_running:
        lines.append("  in another terminal:")
    else:
        lines.append(f"  terminal 1, here (server and publisher stay up until Ctrl-C): {demo}")
        lines.append("  terminal 2:")
    if not at_root:
        # Before the export: DAGSTER_HOME=$PWD/... must name the project folder.
        lines.append(f"    cd {root}" if root else "    cd PROJECT  # the one with definitions.py")
    lines.append(f"    export {' '.join(env)}")
    lines.append(f"    {dev}")
    lines.append(
        f"  then open http://127.0.0.1:3000/assets/{pipeline.name} (Materialize…, Latest, Launch; "
        "the lag chart: Metadata, Plots, Events, nats/sequence_lag)"
    )
    return lines
