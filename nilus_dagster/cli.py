"""``nilus-dagster``: the command line over the manifest and engine layers.

Imports stay inside the verbs so that ``validate`` does not pay for pyarrow, deltalake or Dagster.
"""

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nilus_dagster.errors import NilusError
from nilus_dagster.process_start import start_engine_process
from nilus_dagster.redaction import redact

if TYPE_CHECKING:
    from nilus_dagster.engine import Progress
    from nilus_dagster.manifest.loader import Pipeline


def _validate(args: argparse.Namespace) -> int:
    from nilus_dagster.errors import ManifestError
    from nilus_dagster.manifest.loader import collect_pipelines

    pipelines, problems = collect_pipelines(args.paths)
    for pipeline in pipelines:
        source = pipeline.manifest.source
        sink = pipeline.manifest.sink
        try:
            # Placeholders stay unfilled: validate never reads a secret.
            location = pipeline.table_location(fill_secrets=False)
        except ManifestError as exc:
            problems.extend(exc.problems)
            continue
        needs = source.address.placeholders()
        print(
            redact(
                f"ok  {pipeline.path}: {pipeline.name}: stream {pipeline.stream} subject "
                f"{source.address.subject} -> {sink.options.dest_table} "
                f"({sink.options.incremental_strategy}) at {location.uri}"
                + (f"; needs {', '.join(needs)} at run time" if needs else "")
            )
        )
        _warn_partitions_start(pipeline)
    problems = list(dict.fromkeys(problems))  # one bad depots file is named once
    for problem in problems:
        print(redact(str(problem)), file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} problem(s) in {len({p.file for p in problems})} file(s)",
            file=sys.stderr,
        )
        return 1
    return 0


def _warn_partitions_start(pipeline: "Pipeline") -> None:
    """Warn when a pipeline's partitions have no start.

    A warning, not an error: manifests written for Nilus itself have no ``spec.dagster`` and
    must keep loading; without a start their partitions only begin too early.
    """
    settings = pipeline.manifest.spec.dagster
    if settings.partitions == "none" or settings.partitions_start:
        return
    if pipeline.manifest.source.address.start_time is not None:
        return
    print(
        f"warn {pipeline.path}: spec.dagster.partitions_start: not set, so Dagster shows "
        f"{settings.partitions} partitions from 2020-01-01 on, all missing before the stream "
        "began; add partitions_start: YYYY-MM-DD (the day the stream starts) under "
        "spec.dagster, or a start_time in the address",
        file=sys.stderr,
    )


def _load_one(path: str) -> "Pipeline":
    from nilus_dagster.manifest.loader import parse_pipeline

    return parse_pipeline(path)


def _progress_printer() -> "Callable[[Progress], None] | None":
    if not sys.stderr.isatty():
        return None

    def show(progress: "Progress") -> None:
        target = f"/{progress.target}" if progress.target else ""
        sys.stderr.write(
            f"\r  position {progress.position}{target}  {progress.messages} messages  "
            f"{progress.messages_per_second:,.0f} msg/s  {progress.elapsed_seconds:.1f}s "
        )
        sys.stderr.flush()

    return show


def _run(args: argparse.Namespace) -> int:
    from nilus_dagster.engine import run_pipeline

    pipeline = _load_one(args.pipeline)
    drain = True if args.drain else (False if args.one_batch else None)
    report = run_pipeline(
        pipeline,
        drain=drain,
        max_messages=args.max_messages,
        max_seconds=args.max_seconds,
        on_progress=_progress_printer(),
    )
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    for key, value in report.metadata().items():
        print(f"{key:28} {value}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from nilus_dagster.engine import RunReport, ServiceFailure, serve_pipelines_async

    pipelines = [_load_one(path) for path in args.pipelines]

    def report(result: "RunReport") -> None:
        print(
            f"{result.pipeline}: +{result.messages} messages, position {result.position}, "
            f"sequence lag {result.sequence_lag}, dead letters {result.dead_letters}",
            flush=True,
        )

    def failed(failure: "ServiceFailure") -> None:
        retry = f" (again in {failure.retry_in:g}s)" if failure.retry_in is not None else ""
        print(f"error: {failure.message}{retry}", file=sys.stderr, flush=True)

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        summaries = await serve_pipelines_async(
            pipelines, stop=stop, run_seconds=args.seconds, on_report=report, on_failure=failed
        )
        for summary in summaries:
            print(
                f"{summary.pipeline}: {summary.messages} messages in {summary.commits} commits, "
                f"position {summary.position}, ended by {summary.ended_by}"
            )
        return 1 if any(s.ended_by == "failed" for s in summaries) else 0

    return asyncio.run(serve())


def _lag(args: argparse.Namespace) -> int:
    from nilus_dagster.engine import measure_lag

    pipeline = _load_one(args.pipeline)
    lag = measure_lag(pipeline)
    print(f"{'pipeline':16} {pipeline.name}")
    print(f"{'stream':16} {lag.stream} (sequences {lag.stream_first_seq}..{lag.stream_last_seq})")
    print(f"{'subject':16} {lag.subject}")
    print(f"{'position':16} {lag.position}")
    print(f"{'sequence_lag':16} {lag.sequence_lag}")
    age = f"{lag.lag_seconds:.1f}" if lag.lag_seconds is not None else "-"
    print(f"{'lag_seconds':16} {age}")
    print(f"{'gap':16} {lag.gap}")
    print(f"{'table':16} {lag.table_uri}")
    if lag.problem:
        print(f"problem: {redact(lag.problem)}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from nilus_dagster.demo import run_demo

    # Options left out take run_demo's defaults, which are defined there only.
    given = {"rate": args.rate, "seconds": args.seconds, "store_dir": args.store}
    return run_demo(
        port=args.port,
        keep_running=args.keep_running,
        reset=args.reset,
        **{name: value for name, value in given.items() if value is not None},
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``nilus-dagster`` argument parser: one subcommand per verb."""
    parser = argparse.ArgumentParser(
        prog="nilus-dagster",
        description="Run Nilus NATS JetStream stream pipelines into Delta Lake, on Dagster.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    validate = verbs.add_parser(
        "validate", help="check manifests; prints FILE: FIELD: message for every problem"
    )
    validate.add_argument("paths", nargs="+", help="manifest files, folders or globs")
    validate.set_defaults(handler=_validate)

    run = verbs.add_parser(
        "run",
        help="one run of a pipeline, as a per-tick run does (run_mode: per_tick), without Dagster",
    )
    run.add_argument("pipeline", help="the pipeline's YAML file")
    run.add_argument("--max-messages", type=int, default=None, help="stop after N messages")
    run.add_argument("--max-seconds", type=float, default=None, help="stop pulling after S seconds")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--drain", action="store_true", help="drain what is pending (default with run_in_loop)"
    )
    mode.add_argument("--one-batch", action="store_true", help="pull one batch (the other default)")
    run.set_defaults(handler=_run)

    serve = verbs.add_parser(
        "serve",
        help="keep pipelines ingesting, as a service run does (run_mode: service), without "
        "Dagster; Ctrl-C stops after committing what was pulled",
    )
    serve.add_argument("pipelines", nargs="+", help="the pipelines' YAML files")
    serve.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="end after S seconds (default: spec.dagster.service.run_seconds)",
    )
    serve.set_defaults(handler=_serve)

    lag = verbs.add_parser("lag", help="stream, committed position and sequence lag")
    lag.add_argument("pipeline", help="the pipeline's YAML file")
    lag.set_defaults(handler=_lag)

    demo = verbs.add_parser(
        "demo",
        help="local JetStream server, sample orders, one run into a local Delta table",
    )
    demo.add_argument(
        "--port", type=int, default=None, help="server port (default 4333 when free, else any)"
    )
    demo.add_argument("--rate", type=int, help="orders published per second")
    demo.add_argument("--seconds", type=float, help="how long to publish first")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the server and the publisher up until Ctrl-C (to watch it in dagster dev)",
    )
    demo.add_argument(
        "--reset", action="store_true", help="start over: delete the demo stream and its table"
    )
    demo.add_argument("--store", help="the demo server's JetStream store (kept)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Entry point of the ``nilus-dagster`` console script.

    Args:
        argv: The arguments (``sys.argv[1:]`` by default).
        own_process: The process runs nothing else (the console script): a verb that runs the
            engine imports it first as only such a process can afford to (see
            :mod:`nilus_dagster.process_start`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if own_process and args.verb != "validate":  # validate never imports pyarrow
            start_engine_process()
        return int(args.handler(args) or 0)
    except NilusError as exc:
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The console script: :func:`main`, then leave without the interpreter's teardown.

    pyarrow and deltalake keep native worker threads; tearing the interpreter down around them
    occasionally aborts the process ("terminate called without an active exception", exit -6)
    after all work is done and committed. The exit code must be the verb's, so the process ends
    here once its output is flushed.
    """
    code = main(own_process=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
