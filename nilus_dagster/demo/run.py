"""``nilus-dagster demo`` itself: server, stream, orders, one run, and what to do next."""

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from nilus_dagster.demo.output import (
    checkout_root,
    next_steps,
    prepare_dagster_home,
    reset_table,
    run_summary,
    shown_path,
)
from nilus_dagster.demo.sample import DEFAULT_STORE, sample_pipeline
from nilus_dagster.demo.server import (
    ensure_stream,
    marker_path,
    publish_orders,
    running_demo_server,
    start_server,
)
from nilus_dagster.errors import NilusError

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

            say(f"pipeline   {pipeline.name} ({shown_path(pipeline.path, Path.cwd())})")
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
            demo.stop(marker_path(store))
    return 0
