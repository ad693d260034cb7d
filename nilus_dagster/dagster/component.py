"""A Dagster Component for projects that use ``dg``: a ``defs.yaml`` that loads Nilus manifests.

.. code-block:: yaml

    # defs/ingest/defs.yaml  (dg scaffold defs nilus_dagster.dagster.NilusPipelinesComponent ingest)
    type: nilus_dagster.dagster.NilusPipelinesComponent
    attributes:
      pipelines: [pipelines]          # folders, files or globs, relative to this file
      nats:
        servers: [nats-0.nats:4222]
        password: {env: NATS_PASSWORD}  # read when a run or tick starts, never at load time
      sink:
        depots_file: depots.yaml
      translation:                    # like other components; {{ name }}, {{ stream }}, ...
        group_name: ingest
      resource_keys: {nats: nats_eu}  # several NATS deployments in one project
      on_invalid: skip                # or fail

Every attribute is typed, so ``dg check yaml`` names a misspelt or mistyped field.
``{env: NAME}`` becomes ``dg.EnvVar("NAME")``. Avoid ``{{ env.NAME }}`` templates for secrets:
they are resolved when definitions load, so the value would show in the UI's resource config.
"""

import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
from dagster.components.resolved.context import ResolutionContext
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver
from pydantic import Field, create_model

from nilus_dagster.dagster.definitions import build_nilus_definitions, display_env
from nilus_dagster.dagster.resources import NatsResource, NilusResourceKeys, SinkResource
from nilus_dagster.dagster.scaffold import NilusPipelinesScaffolder
from nilus_dagster.dagster.translator import DagsterNilusTranslator
from nilus_dagster.manifest.loader import Pipeline


class EnvRef(dg.Model):
    """``{env: NAME}``: the value of an environment variable, read when a run or tick starts."""

    env: str


def _with_env_refs(annotation: Any) -> Any:
    """A resource field's type, where every text may also be ``{env: NAME}``."""
    if annotation is str:
        return str | EnvRef
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        return typing.Union[tuple(_with_env_refs(a) for a in args)]  # noqa: UP007
    if origin is dict:
        return dict[args[0], _with_env_refs(args[1])]  # type: ignore[misc]
    if origin is list:
        return list[_with_env_refs(args[0])]  # type: ignore[misc]
    return annotation


def _settings_model(resource: type[dg.ConfigurableResource], name: str) -> type[dg.Model]:
    # The YAML block mirrors the resource's own fields (and their descriptions), so the two
    # cannot drift apart; a field left out keeps the resource's default.
    fields: dict[str, Any] = {
        field_name: (
            _with_env_refs(info.annotation) | None,
            Field(default=None, description=info.description),
        )
        for field_name, info in resource.model_fields.items()
    }
    return create_model(name, __base__=dg.Model, __doc__=resource.__doc__, **fields)


NatsSettings = _settings_model(NatsResource, "NatsSettings")
SinkSettings = _settings_model(SinkResource, "SinkSettings")


class ResourceKeysModel(dg.Model):
    """Keys of the resources the pipelines use (defaults: nats, nilus_sink, nilus_io_manager)."""

    nats: str = NilusResourceKeys.nats
    sink: str = NilusResourceKeys.sink
    io_manager: str = NilusResourceKeys.io_manager


def _env_vars(value: Any) -> Any:
    if isinstance(value, EnvRef):
        return dg.EnvVar(value.env)
    if isinstance(value, dict):
        if set(value) == {"env"} and isinstance(value["env"], str):
            return dg.EnvVar(value["env"])
        return {k: _env_vars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_env_vars(v) for v in value]
    return value


def _settings(context: ResolutionContext, raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    values = context.resolve_value(raw)
    if isinstance(values, dg.Model):
        values = values.model_dump(exclude_none=True)
    return {k: _env_vars(v) for k, v in values.items() if v is not None}


def _resolve_nats(context: ResolutionContext, raw: Any) -> NatsResource | None:
    values = _settings(context, raw)
    return None if values is None else NatsResource(**values)


def _resolve_sink(context: ResolutionContext, raw: Any) -> SinkResource | None:
    values = _settings(context, raw)
    if values is None:
        return None
    # Relative files are relative to the defs.yaml folder, like `pipelines`.
    for name in ("depots_file", "lakehouse"):
        value = values.get(name)
        if isinstance(value, str) and not isinstance(value, dg.EnvVar) and "://" not in value:
            values[name] = str(context.resolve_source_relative_path(value))
    return SinkResource(**values)


def _resolve_keys(context: ResolutionContext, raw: Any) -> NilusResourceKeys:
    values = _settings(context, raw) or {}
    return NilusResourceKeys(**values)


def _translation_vars(pipeline: Pipeline) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "name": pipeline.name,
        "stream": pipeline.stream,
        "subject": pipeline.subject,
        "dest_table": pipeline.manifest.sink.options.dest_table,
    }


@dataclass
class _TranslatedTranslator(DagsterNilusTranslator):
    """The default translator, then the component's ``translation`` on top."""

    translation: TranslationFn[Pipeline] | None = None

    def get_asset_spec(self, pipeline: Pipeline) -> dg.AssetSpec:
        spec = super().get_asset_spec(pipeline)
        return self.translation(spec, pipeline) if self.translation else spec


@dg.scaffold_with(NilusPipelinesScaffolder)
@dataclass
class NilusPipelinesComponent(dg.Component, dg.Resolvable):
    """Nilus NATS JetStream stream pipelines as assets, checks, jobs and sensors.

    Every manifest found under ``pipelines`` becomes an asset (runs the engine into its table),
    with lag, gap and dead-letter checks, a job that runs it in process and a sensor that
    keeps it fresh; the stream it reads is an upstream external asset. ``nats`` and ``sink``
    configure the resources for this deployment, ``translation`` changes the assets' specs
    (``{{ name }}``, ``{{ stream }}``, ``{{ subject }}``, ``{{ dest_table }}``, ``{{ spec }}``),
    ``resource_keys`` renames the resources. Nothing is set for the whole code location.
    """

    pipelines: Sequence[str] = field(default_factory=lambda: ["pipelines"])
    nats: Annotated[
        NatsResource | None,
        dg.Resolver(
            _resolve_nats,
            model_field_type=NatsSettings | None,
            description="NatsResource settings: servers, timeouts, env, credentials.",
        ),
    ] = None
    sink: Annotated[
        SinkResource | None,
        dg.Resolver(
            _resolve_sink,
            model_field_type=SinkSettings | None,
            description="SinkResource settings: depots_file, lakehouse, storage_options, postgres.",
        ),
    ] = None
    translation: Annotated[
        TranslationFn[Pipeline] | None,
        TranslationFnResolver[Pipeline](template_vars_for_translation_fn=_translation_vars),
    ] = None
    resource_keys: Annotated[
        NilusResourceKeys,
        dg.Resolver(
            _resolve_keys,
            model_field_type=ResourceKeysModel | None,
            description="Keys of the NATS and sink resources and the table IO manager.",
        ),
    ] = field(default_factory=NilusResourceKeys)
    on_invalid: Literal["skip", "fail"] = "skip"

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """The definitions of the manifests that ``pipelines`` matches, next to defs.yaml."""
        targets = [
            pattern if Path(pattern).is_absolute() else str(context.path / pattern)
            for pattern in self.pipelines
        ]
        keys = self.resource_keys
        resources: dict[str, Any] = {}
        if self.nats is not None:
            resources[keys.nats] = self.nats
        if self.sink is not None:
            resources[keys.sink] = self.sink
        translator = None
        if self.translation is not None:
            translator = _TranslatedTranslator(
                display_env=display_env(resources.get(keys.sink, SinkResource())),
                translation=self.translation,
            )
        return build_nilus_definitions(
            targets,
            translator=translator,
            resources=resources,
            resource_keys=keys,
            on_invalid=self.on_invalid,
        )
