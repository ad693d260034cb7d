"""Definitions from manifests: one pipeline, or every pipeline under a folder.

**Bad manifests are skipped, loudly.** A manifest that does not validate (or whose
``spec.dagster`` settings Dagster refuses) is left out, and every problem is logged as a warning
in ``nilus-dagster validate``'s ``FILE: FIELD: message`` form and kept in the definitions'
metadata (``nilus/skipped_manifests``). The other pipelines load, and their sensors keep
ingesting: one broken YAML file never stops the healthy pipelines of a code location. To fail
the whole load instead (e.g. in CI), pass ``on_invalid="fail"``; ``nilus-dagster validate``
does the same check without Dagster.
"""

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import dagster as dg

from nilus_dagster.dagster.assets import build_nilus_asset
from nilus_dagster.dagster.constants import NATS_RESOURCE_KEY, SINK_RESOURCE_KEY
from nilus_dagster.dagster.resources import DeltaSinkResource, NatsResource
from nilus_dagster.dagster.sensor import build_nilus_sensor
from nilus_dagster.dagster.translator import DagsterNilusTranslator
from nilus_dagster.errors import ManifestError, Problem
from nilus_dagster.manifest.depots import DEPOTS_ENV, LAKEHOUSE_ENV
from nilus_dagster.manifest.loader import Pipeline, collect_pipelines, default_pipeline_targets
from nilus_dagster.redaction import redact

logger = logging.getLogger("nilus_dagster.dagster")

OnInvalid = Literal["skip", "fail"]
SKIPPED_METADATA_KEY = "nilus/skipped_manifests"

# Shared default instances: Definitions.merge accepts one resource key from several Definitions
# only when it is the very same object.
_DEFAULT_RESOURCES: dict[str, Any] = {
    NATS_RESOURCE_KEY: NatsResource(),
    SINK_RESOURCE_KEY: DeltaSinkResource(),
}


def default_resources() -> dict[str, Any]:
    """The ``nats`` and ``nilus_sink`` resources with default settings (manifests as written)."""
    return dict(_DEFAULT_RESOURCES)


def build_pipeline_definitions(
    pipeline: Pipeline | str | os.PathLike[str],
    *,
    translator: DagsterNilusTranslator | None = None,
    resources: Mapping[str, Any] | None = None,
) -> dg.Definitions:
    """The asset (with its checks) and the sensor of one pipeline.

    Args:
        pipeline: A validated pipeline, or the path of its manifest.
        translator: How the pipeline appears in Dagster.
        resources: ``nats`` / ``nilus_sink`` resources; the shared defaults when omitted.

    Raises:
        ManifestError: The manifest (given as a path) does not validate.
    """
    if not isinstance(pipeline, Pipeline):
        from nilus_dagster.manifest.loader import parse_pipeline

        pipeline = parse_pipeline(pipeline)
    asset = build_nilus_asset(pipeline, translator=translator)
    sensor = build_nilus_sensor(pipeline, asset, translator=translator)
    return dg.Definitions(
        assets=[asset],
        sensors=[sensor],
        resources={**default_resources(), **(resources or {})},
    )


def build_nilus_definitions(
    targets: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    *,
    translator: DagsterNilusTranslator | None = None,
    resources: Mapping[str, Any] | None = None,
    on_invalid: OnInvalid = "skip",
) -> dg.Definitions:
    """Every pipeline under ``targets``: assets, checks, sensors and the two resources.

    Args:
        targets: Folders (searched recursively), files or globs; default ``NILUS_PIPELINES``
            (os.pathsep-separated), else ``pipelines/``. Depots files are ignored.
        translator: How pipelines appear in Dagster.
        resources: Overrides of the ``nats`` and ``nilus_sink`` resources.
        on_invalid: ``skip`` (default): leave bad manifests out and log every problem;
            ``fail``: raise, so the code location fails to load with the problems.

    Raises:
        ManifestError: With ``on_invalid="fail"``, every problem found.

    Examples:
        .. code-block:: python

            # definitions.py
            from nilus_dagster.dagster import build_nilus_definitions

            defs = build_nilus_definitions("pipelines")
    """
    if targets is None:
        target_list: list[str | os.PathLike[str]] = list(default_pipeline_targets())
    elif isinstance(targets, str | os.PathLike):
        target_list = [targets]
    else:
        target_list = list(targets)
    resources = {**default_resources(), **(resources or {})}
    translator = translator or DagsterNilusTranslator(
        display_env=_display_env(resources.get(SINK_RESOURCE_KEY))
    )

    pipelines, problems = collect_pipelines(target_list)
    per_pipeline: list[dg.Definitions] = []
    for pipeline in pipelines:
        try:
            per_pipeline.append(
                build_pipeline_definitions(pipeline, translator=translator, resources=resources)
            )
        except (dg.DagsterError, ValueError) as exc:
            # e.g. spec.dagster.partitions_start that Dagster cannot use.
            problems.append(Problem(str(pipeline.path), "spec.dagster", str(exc).splitlines()[0]))

    metadata: dict[str, Any] = {}
    if problems:
        lines = [redact(str(problem)) for problem in problems]
        if on_invalid == "fail":
            raise ManifestError(problems)
        logger.warning(
            "skipped %d manifest problem(s); the other pipelines are loaded "
            "(check them with `nilus-dagster validate`):\n%s",
            len(problems),
            "\n".join(lines),
        )
        metadata[SKIPPED_METADATA_KEY] = dg.MetadataValue.md(
            "\n".join(f"- `{line}`" for line in lines)
        )
    merged = dg.Definitions.merge(*per_pipeline) if per_pipeline else dg.Definitions()
    return dg.Definitions(
        assets=merged.assets,
        sensors=merged.sensors,
        resources=resources,
        metadata=metadata or None,
        # A run is one async step: a step subprocess would only add ~2 s to every run. Only the
        # code location's own Definitions set it, so composing the per-pipeline ones into a
        # project with an executor of its own never conflicts.
        executor=dg.in_process_executor,
    )


def _display_env(sink: object) -> dict[str, str] | None:
    """The load-time environment that shows where tables live under the sink resource."""
    if not isinstance(sink, DeltaSinkResource):
        return None
    env = dict(os.environ)
    # EnvVar values are only read at run time; plain strings are known now.
    for name, value in ((DEPOTS_ENV, sink.depots_file), (LAKEHOUSE_ENV, sink.lakehouse)):
        if isinstance(value, str) and not isinstance(value, dg.EnvVar):
            env[name] = str(Path(value))
    return env
