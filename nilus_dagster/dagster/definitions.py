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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import dagster as dg

from nilus_dagster.dagster.assets import build_nilus_asset
from nilus_dagster.dagster.io_manager import NilusTableIOManager
from nilus_dagster.dagster.resources import NatsResource, NilusResourceKeys, SinkResource
from nilus_dagster.dagster.sensor import build_nilus_sensor, build_pipeline_job
from nilus_dagster.dagster.service import ServiceGroup, build_service_job, service_groups
from nilus_dagster.dagster.supervisor import build_service_sensor
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
_DEFAULT_NATS = NatsResource()
_DEFAULT_SINK = SinkResource()
_DEFAULT_IO_MANAGER = NilusTableIOManager(sink=_DEFAULT_SINK)


def default_resources(resource_keys: NilusResourceKeys | None = None) -> dict[str, Any]:
    """The NATS and sink resources and the table IO manager, with default settings.

    Default settings use the manifests as written. The keys are ``resource_keys`` (by default
    ``nats``, ``nilus_sink`` and ``nilus_io_manager``).
    """
    keys = resource_keys or NilusResourceKeys()
    return {
        keys.nats: _DEFAULT_NATS,
        keys.sink: _DEFAULT_SINK,
        keys.io_manager: _DEFAULT_IO_MANAGER,
    }


def _resources(keys: NilusResourceKeys, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    resources = {**default_resources(keys), **(overrides or {})}
    sink = resources[keys.sink]
    if (
        keys.io_manager not in (overrides or {})
        and sink is not _DEFAULT_SINK
        and isinstance(sink, SinkResource)
    ):
        # Downstream assets read the tables where the pipelines write them.
        resources[keys.io_manager] = NilusTableIOManager(sink=sink)
    return resources


def build_pipeline_definitions(
    pipeline: Pipeline | str | os.PathLike[str],
    *,
    translator: DagsterNilusTranslator | None = None,
    resources: Mapping[str, Any] | None = None,
    resource_keys: NilusResourceKeys | None = None,
    with_service: bool = True,
) -> dg.Definitions:
    """The asset (with its checks), the stream it reads, and what keeps it fresh.

    A ``per_tick`` pipeline gets its job and sensor; a ``service`` pipeline a service job and
    the job's supervisor sensor (see :mod:`nilus_dagster.dagster.service`).

    Args:
        pipeline: A validated pipeline, or the path of its manifest.
        translator: How the pipeline appears in Dagster.
        resources: Resources by key, over the shared defaults.
        resource_keys: The keys of the NATS and sink resources and of the table IO manager.
        with_service: ``False`` leaves a service pipeline's job and supervisor out (the
            caller groups several pipelines into one service run).

    Raises:
        ManifestError: The manifest (given as a path) does not validate.
    """
    if not isinstance(pipeline, Pipeline):
        from nilus_dagster.manifest.loader import parse_pipeline

        pipeline = parse_pipeline(pipeline)
    translator = translator or DagsterNilusTranslator()
    keys = resource_keys or NilusResourceKeys()
    asset = build_nilus_asset(pipeline, translator=translator, resource_keys=keys)
    parts = dg.Definitions(
        assets=[translator.get_stream_asset_spec(pipeline), asset],
        resources=_resources(keys, resources),
    )
    # Every pipeline has its own in-process job: per-tick runs go through it, and so do window
    # backfills and UI materializations beside a service run, whatever the host's executor.
    job = build_pipeline_job(pipeline, asset, translator=translator)
    if pipeline.run_mode == "per_tick":
        sensor = build_nilus_sensor(
            pipeline, asset, translator=translator, resource_keys=keys, job=job
        )
        return dg.Definitions.merge(parts, dg.Definitions(jobs=[job], sensors=[sensor]))
    parts = dg.Definitions.merge(parts, dg.Definitions(jobs=[job]))
    if not with_service:
        return parts
    # On its own, the pipeline is its own service group: named after it, so that the
    # definitions of several pipelines merge without clashing job or sensor names.
    group = ServiceGroup(pipeline.name, (pipeline,), (asset.key,))
    return dg.Definitions.merge(parts, _service_parts([group], keys))


def service_definitions(
    pipelines: Sequence[Pipeline],
    translator: DagsterNilusTranslator | None = None,
    resource_keys: NilusResourceKeys | None = None,
) -> dg.Definitions:
    """The service jobs and their supervisor sensors for the service-mode ``pipelines``."""
    keys = resource_keys or NilusResourceKeys()
    return _service_parts(service_groups(pipelines, translator), keys)


def _service_parts(groups: Sequence[ServiceGroup], keys: NilusResourceKeys) -> dg.Definitions:
    jobs: list[dg.JobDefinition] = []
    sensors: list[dg.SensorDefinition] = []
    for group in groups:
        if keys != NilusResourceKeys():
            # A second deployment merged into the same code location: its jobs are named
            # after its NATS resource, so that they do not clash with the first one's.
            group = replace(group, name=f"{group.name}_{keys.nats}")
        job = build_service_job(group, nats_key=keys.nats, sink_key=keys.sink)
        jobs.append(job)
        sensors.append(build_service_sensor(group, job, nats_key=keys.nats, sink_key=keys.sink))
    return dg.Definitions(jobs=jobs, sensors=sensors)


def build_nilus_definitions(
    targets: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    *,
    translator: DagsterNilusTranslator | None = None,
    resources: Mapping[str, Any] | None = None,
    resource_keys: NilusResourceKeys | None = None,
    on_invalid: OnInvalid = "skip",
) -> dg.Definitions:
    """Every pipeline under ``targets``: assets, checks, streams, jobs, sensors and resources.

    What it returns sets nothing for the whole code location (no executor, no ``io_manager``),
    so it merges into a project's own ``Definitions`` or ``dg`` defs folder without changing
    how that project's other assets run. The pipelines' runs go through their own jobs, which
    run in process.

    Args:
        targets: Folders (searched recursively), files or globs; default ``NILUS_PIPELINES``
            (os.pathsep-separated), else ``pipelines/``. Depots files are ignored.
        translator: How pipelines appear in Dagster.
        resources: Resources by key, over the defaults (``nats``, ``nilus_sink``,
            ``nilus_io_manager``).
        resource_keys: Other keys for those three, e.g. for two NATS deployments in one
            code location.
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
    keys = resource_keys or NilusResourceKeys()
    resources = _resources(keys, resources)
    translator = translator or DagsterNilusTranslator(
        display_env=display_env(resources.get(keys.sink))
    )

    pipelines, problems = collect_pipelines(target_list)
    per_pipeline: list[dg.Definitions] = []
    built: list[Pipeline] = []
    for pipeline in pipelines:
        try:
            per_pipeline.append(
                build_pipeline_definitions(
                    pipeline,
                    translator=translator,
                    resources=resources,
                    resource_keys=keys,
                    with_service=False,
                )
            )
            built.append(pipeline)
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
    per_pipeline.append(service_definitions(built, translator, keys))
    merged = dg.Definitions.merge(*per_pipeline)
    return dg.Definitions(
        assets=_unique_streams(merged.assets or []),
        jobs=merged.jobs,
        sensors=merged.sensors,
        resources=resources,
        metadata=metadata or None,
    )


def _unique_streams(assets: Iterable[Any]) -> list[Any]:
    """The assets, with each stream's external spec kept once.

    Every pipeline reading a stream declares it, and a translator may describe it differently
    per pipeline.
    """
    seen: set[dg.AssetKey] = set()
    unique = []
    for asset in assets:
        if isinstance(asset, dg.AssetSpec):
            if asset.key in seen:
                continue
            seen.add(asset.key)
        unique.append(asset)
    return unique


def display_env(sink: object) -> dict[str, str] | None:
    """The load-time environment that shows where tables live under the sink resource."""
    if not isinstance(sink, SinkResource):
        return None
    env = dict(os.environ)
    # EnvVar values are only read at run time; plain strings are known now.
    for name, value in ((DEPOTS_ENV, sink.depots_file), (LAKEHOUSE_ENV, sink.lakehouse)):
        if isinstance(value, str) and not isinstance(value, dg.EnvVar):
            env[name] = str(Path(value))
    return env
