"""Finding, reading and validating pipeline manifests, with errors a person can act on."""

import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nilus_dagster.errors import ManifestError, Problem
from nilus_dagster.manifest.address import NATS_OPTIONS, AddressError, NatsAddress
from nilus_dagster.manifest.depots import TableLocation, resolve_table_location
from nilus_dagster.manifest.model import PipelineManifest, SinkOptions, SourceOptions
from nilus_dagster.manifest.projection import projected_environment

PIPELINES_ENV = "NILUS_PIPELINES"
DEFAULT_PIPELINES_DIR = "pipelines"
YAML_SUFFIXES = (".yaml", ".yml")

# What to write when a required field is missing.
_REQUIRED_HINTS = {
    "name": "add name: <pipeline-name> at the top of the file",
    "spec": "add a spec: block with type, source and sink",
    "spec.type": "add type: stream under spec",
    "spec.source": "add a source: block with address and options under spec",
    "spec.sink": "add a sink: block with address and options under spec",
    "spec.source.address": "add address: nats+jetstream://HOST:PORT?subject=SUBJECT",
    "spec.source.options": "add options: {source_table: <stream name>}",
    "spec.source.options.source_table": "add source_table: <JetStream stream name>",
    "spec.sink.address": "add address: dataos://<depot>?purpose=rw",
    "spec.sink.options": "add options: {dest_table: schema.table, incremental_strategy: append}",
    "spec.sink.options.dest_table": "add dest_table: <schema>.<table>",
}

_KNOWN_KEYS = {
    "spec.source.options": sorted(SourceOptions.model_fields),
    "spec.sink.options": sorted(SinkOptions.model_fields),
}


@dataclass(frozen=True)
class Pipeline:
    """A validated manifest and the file it came from."""

    manifest: PipelineManifest
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def app_id(self) -> str:
        """The Delta transaction app id that carries this pipeline's position."""
        return f"nilus-dagster/{self.manifest.name}"

    @property
    def stream(self) -> str:
        return self.manifest.source.options.source_table

    @property
    def subject(self) -> str:
        return self.manifest.source.address.subject

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The run-time environment: ``env`` (or ``os.environ``) plus the projection."""
        return projected_environment(self.manifest, env, where=f"{self.path}: spec.use.projection")

    def resolved_source(self, env: Mapping[str, str] | None = None) -> NatsAddress:
        """The source address with its placeholders filled (run time only)."""
        return self.manifest.source.address.resolve(
            self.environment(env), where=f"{self.path}: spec.source.address"
        )

    def table_location(
        self, env: Mapping[str, str] | None = None, *, fill_secrets: bool = True
    ) -> TableLocation:
        """Where the pipeline's Delta table lives."""
        environment = self.environment(env) if fill_secrets else dict(os.environ if env is None else env)
        return resolve_table_location(
            self.manifest.sink,
            environment,
            where=f"{self.path}: spec.sink",
            fill_secrets=fill_secrets,
        )


def _loc_to_field(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-"))


def _problems_from_validation(file: str, error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        field = _loc_to_field(item["loc"])
        kind = item["type"]
        if kind == "missing":
            hint = _REQUIRED_HINTS.get(field, "add it")
            message = f"is required: {hint}"
        elif kind == "extra_forbidden":
            parent, _, key = field.rpartition(".")
            known = _KNOWN_KEYS.get(parent)
            message = f"{key!r} is not a known option"
            if known:
                message += f"; known options: {', '.join(known)}"
            else:
                message += "; remove it or check its spelling"
        elif kind == "value_error":
            cause = item.get("ctx", {}).get("error")
            if isinstance(cause, AddressError):
                field = f"{field}.{cause.part}"
                message = str(cause)
                if cause.part in NATS_OPTIONS or cause.part in ("host", "port"):
                    pass
            else:
                message = str(cause) if cause else item["msg"]
        elif kind == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            message = f"must be {expected}, got {item.get('input')!r}"
        elif kind in ("bool_parsing", "bool_type"):
            message = f"must be true or false, got {item.get('input')!r}"
        elif kind.startswith(("int_", "greater_than")):
            message = f"must be a positive whole number, got {item.get('input')!r}"
        elif kind in ("string_type", "dict_type", "model_type", "tuple_type", "list_type"):
            expected = {
                "string_type": "a string",
                "dict_type": "a mapping",
                "model_type": "a mapping",
                "tuple_type": "a list",
                "list_type": "a list",
            }[kind]
            message = f"must be {expected}, got {type(item.get('input')).__name__}"
        else:
            message = item["msg"]
        problems.append(Problem(file, field or "(top level)", message))
    return problems


def is_depots_file(data: object) -> bool:
    """A YAML mapping holding only ``depots`` is a depots file, not a pipeline."""
    return isinstance(data, dict) and "depots" in data and "spec" not in data


def parse_pipeline(path: str | os.PathLike[str], text: str | None = None) -> Pipeline:
    """Read and validate one manifest.

    Raises:
        ManifestError: Every problem found, each naming the file and field.
    """
    file = Path(path)
    where = str(file)
    if text is None:
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError([Problem(where, "(file)", "does not exist")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError([Problem(where, "(file)", f"cannot be read: {exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(
            [Problem(where, position, f"is not valid YAML: {reason}; fix the indentation or quoting")]
        ) from None
    if data is None:
        raise ManifestError([Problem(where, "(file)", "is empty: write a Nilus manifest")])
    if not isinstance(data, dict):
        raise ManifestError(
            [Problem(where, "(top level)", f"must be a mapping, got {type(data).__name__}")]
        )
    try:
        manifest = PipelineManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_problems_from_validation(where, exc)) from None
    return Pipeline(manifest=manifest, path=file)


def find_manifest_files(targets: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursively), files and glob patterns to YAML files, sorted and unique."""
    found: dict[Path, None] = {}
    for target in targets:
        text = str(target)
        if any(c in text for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
        else:
            matches = [Path(text)]
        for match in matches:
            if match.is_dir():
                for child in sorted(match.rglob("*")):
                    if child.suffix in YAML_SUFFIXES and child.is_file():
                        found[child] = None
            else:
                found[match] = None
    return list(found)


def default_pipeline_targets(env: Mapping[str, str] | None = None) -> list[str]:
    """``NILUS_PIPELINES`` (a folder, file or glob; several joined by os.pathsep) or ``pipelines/``."""
    env = os.environ if env is None else env
    value = env.get(PIPELINES_ENV)
    if value:
        return [part for part in value.split(os.pathsep) if part]
    return [DEFAULT_PIPELINES_DIR]


def collect_pipelines(
    targets: Iterable[str | os.PathLike[str]],
) -> tuple[list[Pipeline], list[Problem]]:
    """Load every manifest under ``targets``; return the good ones and every problem found.

    Depots files are skipped. Two pipelines with one name are both reported.
    """
    pipelines: list[Pipeline] = []
    problems: list[Problem] = []
    files = find_manifest_files(targets)
    if not files:
        problems.append(
            Problem(", ".join(str(t) for t in targets), "(files)", "no *.yaml or *.yml found")
        )
    for file in files:
        if not file.exists():
            problems.append(Problem(str(file), "(file)", "does not exist"))
            continue
        try:
            text = file.read_text(encoding="utf-8")
            if is_depots_file(yaml.safe_load(text)):
                continue
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            text = None
        try:
            pipelines.append(parse_pipeline(file, text))
        except ManifestError as exc:
            problems.extend(exc.problems)
    seen: dict[str, Pipeline] = {}
    unique: list[Pipeline] = []
    for pipeline in pipelines:
        first = seen.get(pipeline.name)
        if first is not None:
            problems.append(
                Problem(
                    str(pipeline.path),
                    "name",
                    f"{pipeline.name!r} is already used by {first.path}; pipeline names must "
                    "be unique",
                )
            )
            continue
        seen[pipeline.name] = pipeline
        unique.append(pipeline)
    return unique, problems


def load_pipelines(targets: Iterable[str | os.PathLike[str]]) -> list[Pipeline]:
    """Load every manifest under ``targets``.

    Raises:
        ManifestError: Any problem in any file (all of them are listed).
    """
    pipelines, problems = collect_pipelines(targets)
    if problems:
        raise ManifestError(problems)
    return pipelines
