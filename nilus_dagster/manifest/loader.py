"""Finding, reading and validating pipeline manifests, with errors a person can act on."""

import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nilus_dagster.errors import ManifestError, Problem
from nilus_dagster.manifest.address import AddressError, NatsAddress
from nilus_dagster.manifest.depots import TableLocation, load_depots, resolve_table_location
from nilus_dagster.manifest.model import (
    PipelineManifest,
    Sink,
    SinkOptions,
    Source,
    SourceOptions,
    Spec,
)
from nilus_dagster.manifest.projection import projected_environment
from nilus_dagster.manifest.yaml_text import field_key, load_yaml

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
    "": sorted(PipelineManifest.model_fields),
    "spec": sorted(Spec.model_fields),
    "spec.source": sorted(Source.model_fields),
    "spec.sink": sorted(Sink.model_fields),
    "spec.source.options": sorted(SourceOptions.model_fields),
    "spec.sink.options": sorted(SinkOptions.model_fields),
}

# What a wrong literal usually means.
_LITERAL_HINTS = {
    "type": "v1 workflow/service manifests (stack: nilus) are not read; write the v2 shape "
    "with type: nilus and the pipeline under spec",
}

_TYPE_WORDS = {
    "NoneType": "nothing",
    "str": "text",
    "int": "a number",
    "float": "a number",
    "bool": "true/false",
    "list": "a list",
    "dict": "a mapping",
    "date": "a date",
    "datetime": "a time",
}


@dataclass(frozen=True)
class Pipeline:
    """A validated manifest and the file it came from."""

    manifest: PipelineManifest
    path: Path

    @property
    def name(self) -> str:
        """The pipeline's name."""
        return self.manifest.name

    @property
    def app_id(self) -> str:
        """The Delta transaction app id that carries this pipeline's position."""
        return f"nilus-dagster/{self.manifest.name}"

    @property
    def stream(self) -> str:
        """The source stream (``source_table``)."""
        return self.manifest.source.options.source_table

    @property
    def run_mode(self) -> str:
        """``service`` or ``per_tick``: ``spec.dagster.run_mode``, else by ``run_in_loop``."""
        mode = self.manifest.spec.dagster.run_mode
        if mode is not None:
            return mode
        return "service" if self.manifest.source.options.run_in_loop else "per_tick"

    @property
    def subject(self) -> str:
        """The subject the pipeline reads."""
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
        self,
        env: Mapping[str, str] | None = None,
        *,
        fill_secrets: bool = True,
        connection: Mapping[str, str] | None = None,
    ) -> TableLocation:
        """Where the pipeline's Delta table lives.

        Args:
            env: The environment (``os.environ`` by default).
            fill_secrets: Fill storage-option placeholders (run time); ``False`` keeps them
                as written and reads no secret (load time, display).
            connection: libpq parameters replacing a PostgreSQL address's (a deployment's).

        Raises:
            ManifestError: The depots file is malformed or lacks the sink's depot.
            PlaceholderError: A storage option needs a variable that is not set.
        """
        if fill_secrets:
            environment = self.environment(env)
        else:
            environment = dict(os.environ if env is None else env)
        return resolve_table_location(
            self.manifest.sink,
            environment,
            file=str(self.path),
            fill_secrets=fill_secrets,
            connection=connection,
        )


def _loc_to_field(loc: Sequence[Any]) -> str:
    return ".".join(field_key(part) for part in loc if not str(part).startswith("function-"))


def _shown(value: object) -> str:
    # Inputs can be long (a pasted certificate): keep messages to one readable line.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_word(value: object) -> str:
    name = type(value).__name__
    return _TYPE_WORDS.get(name, name)


def _message(item: Mapping[str, Any]) -> tuple[str, str]:
    """The field to name and the message for one pydantic error item."""
    loc = [part for part in item["loc"] if not str(part).startswith("function-")]
    field = _loc_to_field(loc)
    kind = item["type"]
    value = item.get("input")
    ctx = item.get("ctx") or {}
    if kind == "missing":
        return field, f"is required: {_REQUIRED_HINTS.get(field, 'add it')}"
    if kind == "extra_forbidden":
        known = _KNOWN_KEYS.get(_loc_to_field(loc[:-1]), [])
        message = f"is not a known option; {_did_you_mean(str(loc[-1]), known)}"
        if known:
            return field, message + f"known options: {', '.join(known)}"
        return field, message + "remove it or check its spelling"
    if kind == "value_error":
        cause = ctx.get("error")
        if isinstance(cause, AddressError):
            return f"{field}.{field_key(cause.part)}", str(cause)
        return field, str(cause) if cause else str(item["msg"])
    if value is None and field in _REQUIRED_HINTS:
        return field, f"is empty: {_REQUIRED_HINTS[field]}"
    if kind == "literal_error":
        message = f"must be {ctx.get('expected', '')}, got {_shown(value)}"
        if field in _LITERAL_HINTS:
            message += f"; {_LITERAL_HINTS[field]}"
        return field, message
    if kind in ("bool_parsing", "bool_type"):
        return field, f"must be true or false, got {_shown(value)}"
    if kind.startswith(("int_", "greater_than")):
        return field, f"must be a positive whole number, got {_shown(value)}"
    if kind.startswith("string_"):
        if kind == "string_type":
            return field, f"must be text, got {_type_word(value)} {_shown(value)}"
        return field, f"{item['msg'].lower()}, got {_shown(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return field, f"must be a mapping (key: value lines), got {_type_word(value)}"
    if kind in ("tuple_type", "list_type"):
        return field, f"must be a list, got {_type_word(value)} {_shown(value)}"
    return field, f"{item['msg']}, got {_shown(value)}"


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    close = get_close_matches(key, known, n=1)
    return f"did you mean {close[0]}? " if close else ""


def _problems_from_validation(file: str, error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        field, message = _message(item)
        problems.append(Problem(file, field or "(top level)", message))
    return list(dict.fromkeys(problems))


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
    return _pipeline_from_data(file, load_yaml(text, where))


def _pipeline_from_data(file: Path, data: object) -> Pipeline:
    where = str(file)
    if data is None:
        raise ManifestError(
            [Problem(where, "(file)", "is empty: write a Nilus manifest (name:, spec:)")]
        )
    if not isinstance(data, dict):
        raise ManifestError(
            [
                Problem(
                    where,
                    "(top level)",
                    f"must be a mapping (name:, spec: ...), got {_type_word(data)}; "
                    "a file holds one pipeline",
                )
            ]
        )
    try:
        manifest = PipelineManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_problems_from_validation(where, exc)) from None
    return Pipeline(manifest=manifest, path=file)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def find_manifest_files(targets: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursively), files and glob patterns to YAML files, sorted and unique.

    A file named directly is kept whatever its suffix (and even when it does not exist, so that
    the caller can say so); folders and globs contribute ``*.yaml``/``*.yml`` files only.
    """
    found: dict[Path, Path] = {}
    for target in targets:
        text = str(target)
        if _is_glob(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            matches = [m for m in matches if m.is_dir() or m.suffix in YAML_SUFFIXES]
        else:
            matches = [Path(text)]
        for match in matches:
            if match.is_dir():
                children = [
                    child
                    for child in sorted(match.rglob("*"))
                    if child.suffix in YAML_SUFFIXES and child.is_file()
                ]
            else:
                children = [match]
            for child in children:
                # One file reached twice (pipelines/ and pipelines/a.yaml) is read once.
                found.setdefault(child.resolve(), child)
    return list(found.values())


def default_pipeline_targets(env: Mapping[str, str] | None = None) -> list[str]:
    """``NILUS_PIPELINES`` (folders, files or globs joined by os.pathsep), else ``pipelines/``."""
    env = os.environ if env is None else env
    value = env.get(PIPELINES_ENV)
    if value:
        return [part for part in value.split(os.pathsep) if part]
    return [DEFAULT_PIPELINES_DIR]


def collect_pipelines(
    targets: Iterable[str | os.PathLike[str]],
) -> tuple[list[Pipeline], list[Problem]]:
    """Load every manifest under ``targets``; return the good ones and every problem found.

    Depots-only files are checked, then skipped. Of two pipelines with one name the first (in
    path order) is kept and the second reported. A glob or folder that finds nothing, and a
    named file that does not exist, are problems too.
    """
    pipelines: list[Pipeline] = []
    problems: list[Problem] = []
    targets = list(targets)
    for target in targets:
        if _is_glob(str(target)) and not find_manifest_files([target]):
            problems.append(Problem(str(target), "(files)", "matches no *.yaml or *.yml file"))
        elif Path(target).is_dir() and not find_manifest_files([target]):
            problems.append(Problem(str(target), "(files)", "holds no *.yaml or *.yml file"))
    for file in find_manifest_files(targets):
        try:
            pipeline = _read_pipeline(file)
        except ManifestError as exc:
            problems.extend(exc.problems)
            continue
        if pipeline is not None:
            pipelines.append(pipeline)
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


def _read_pipeline(file: Path) -> Pipeline | None:
    """Parse one file; ``None`` for a depots file (checked, then skipped)."""
    where = str(file)
    if not file.exists():
        raise ManifestError([Problem(where, "(file)", "does not exist")])
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ManifestError([Problem(where, "(file)", f"cannot be read: {reason}")]) from None
    data = load_yaml(text, where)
    if is_depots_file(data):
        load_depots(file)
        return None
    return _pipeline_from_data(file, data)


def load_pipelines(targets: Iterable[str | os.PathLike[str]]) -> list[Pipeline]:
    """Load every manifest under ``targets``.

    Raises:
        ManifestError: Any problem in any file (all of them are listed).
    """
    pipelines, problems = collect_pipelines(targets)
    if problems:
        raise ManifestError(problems)
    return pipelines
