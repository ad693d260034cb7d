"""``nilus-dagster``: the command line over the manifest and engine layers.

Imports stay inside the verbs so that ``validate`` does not pay for pyarrow, deltalake or Dagster.
"""

import argparse
import sys
from collections.abc import Sequence

from nilus_dagster.errors import NilusError
from nilus_dagster.redaction import redact


def _validate(args: argparse.Namespace) -> int:
    from nilus_dagster.manifest.loader import collect_pipelines

    pipelines, problems = collect_pipelines(args.paths)
    for pipeline in pipelines:
        source = pipeline.manifest.source
        sink = pipeline.manifest.sink
        location = pipeline.table_location(fill_secrets=False)
        print(
            f"ok  {pipeline.path}: {pipeline.name}: stream {pipeline.stream} subject "
            f"{source.address.subject} -> {sink.options.dest_table} "
            f"({sink.options.incremental_strategy}) at {location.uri}"
        )
    for problem in problems:
        print(redact(str(problem)), file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} problem(s) in {len({p.file for p in problems})} file(s)",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nilus-dagster`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except NilusError as exc:
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
