"""Resources -> the engine's arguments: environment, servers, credentials, storage options."""

import textwrap

import dagster as dg
import pytest

from nilus_dagster.dagster import (
    DeltaSinkResource,
    NatsResource,
    SinkResource,
    build_pipeline_definitions,
)
from nilus_dagster.dagster.resources import engine_call
from nilus_dagster.engine import runtime_settings
from nilus_dagster.errors import SourceError
from nilus_dagster.manifest import parse_pipeline
from nilus_dagster.redaction import redact


def _pipeline(tmp_path, address):
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: p
            spec:
              type: stream
              source:
                address: "{address}"
                options: {{source_table: S}}
              sink:
                address: dataos://lake?purpose=rw
                options: {{dest_table: a.b}}
            """
        )
    )
    return parse_pipeline(path)


def test_defaults_pass_the_manifest_and_process_environment_through(tmp_path, monkeypatch):
    monkeypatch.setenv("NATS_TOKEN", "tok-from-env")
    pipeline = _pipeline(tmp_path, "nats+jetstream://{NATS_TOKEN}@h:4222?subject=x")

    call = engine_call(pipeline)

    assert call.pipeline is pipeline
    assert call.servers is None
    assert call.env["NATS_TOKEN"] == "tok-from-env"
    assert call.pipeline.resolved_source(call.env).token == "tok-from-env"


def test_resource_env_and_sink_settings_win_over_the_process(tmp_path, monkeypatch):
    monkeypatch.setenv("NATS_TOKEN", "process")
    pipeline = _pipeline(tmp_path, "nats+jetstream://{NATS_TOKEN}@h:4222?subject=x")

    call = engine_call(
        pipeline,
        NatsResource(servers=["n1:4222", "n2:4222"], env={"NATS_TOKEN": "resource"}),
        SinkResource(lakehouse=str(tmp_path / "elsewhere")),
    )

    assert call.servers == ["n1:4222", "n2:4222"]
    assert call.pipeline.resolved_source(call.env).token == "resource"
    assert call.pipeline.table_location(call.env).uri == str(tmp_path / "elsewhere/lake/a/b")


def test_explicit_credentials_replace_the_manifests(tmp_path):
    pipeline = _pipeline(tmp_path, "nats+jetstream://{NATS_TOKEN}@h:4222?subject=x")
    password = "p{a}ss@w/rd"  # braces and URI characters stay literal

    call = engine_call(pipeline, NatsResource(user="svc", password=password))
    resolved = call.pipeline.resolved_source(call.env)

    assert (resolved.user, resolved.password, resolved.token) == ("svc", password, None)
    assert password not in redact(f"failed with {password}")  # registered as a secret
    assert password not in call.pipeline.manifest.source.address.redacted()


def test_password_alone_keeps_the_manifests_user(tmp_path):
    pipeline = _pipeline(tmp_path, "nats+jetstream://nilus:{NATS_PASSWORD}@h:4222?subject=x")

    call = engine_call(pipeline, NatsResource(password="override"))
    resolved = call.pipeline.resolved_source(call.env)

    assert (resolved.user, resolved.password) == ("nilus", "override")


def test_several_auth_modes_on_the_resource_are_refused(tmp_path):
    pipeline = _pipeline(tmp_path, "nats+jetstream://h:4222?subject=x")

    with pytest.raises(SourceError, match="several auth modes"):
        engine_call(pipeline, NatsResource(token="t", user="u", password="p"))


def test_storage_options_are_added_to_the_table_location(tmp_path):
    pipeline = _pipeline(tmp_path, "nats+jetstream://h:4222?subject=x")

    call = engine_call(pipeline, sink=SinkResource(storage_options={"timeout": "120s"}))

    assert call.pipeline.table_location(call.env).storage_options == {"timeout": "120s"}
    assert call.pipeline.name == "p" and call.pipeline.path == pipeline.path


def test_env_var_fields_are_read_when_the_resource_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOY_TOKEN", "from-envvar")
    pipeline = _pipeline(tmp_path, "nats+jetstream://{NATS_TOKEN}@h:4222?subject=x")
    seen = {}

    @dg.asset
    def probe(nats: NatsResource) -> None:
        seen["token"] = (
            engine_call(pipeline, nats)
            .pipeline.resolved_source(engine_call(pipeline, nats).env)
            .token
        )

    dg.materialize(
        [probe], resources={"nats": NatsResource(env={"NATS_TOKEN": dg.EnvVar("DEPLOY_TOKEN")})}
    )

    assert seen["token"] == "from-envvar"


def test_failover_timeout_resource_then_env_then_address(tmp_path, monkeypatch):
    pipeline = _pipeline(tmp_path, "nats+jetstream://h:4222?subject=x&failover_timeout=45")
    monkeypatch.delenv("NILUS_NATS_FAILOVER_TIMEOUT", raising=False)

    assert runtime_settings(pipeline).failover_timeout == 45
    monkeypatch.setenv("NILUS_NATS_FAILOVER_TIMEOUT", "20")
    assert runtime_settings(pipeline).failover_timeout == 20
    call = engine_call(pipeline, NatsResource(failover_timeout=90))
    assert runtime_settings(call.pipeline, env=call.env).failover_timeout == 90
    call = engine_call(pipeline, NatsResource(failover_timeout=0))
    with pytest.raises(SourceError, match=r"NILUS_NATS_FAILOVER_TIMEOUT='0\.0' is not a positive"):
        runtime_settings(call.pipeline, env=call.env)
    monkeypatch.setenv("NILUS_NATS_FAILOVER_TIMEOUT", "soon")
    with pytest.raises(SourceError, match="NILUS_NATS_FAILOVER_TIMEOUT='soon' is not a positive"):
        runtime_settings(pipeline)


def test_the_sink_resources_earlier_name_still_configures_runs_and_downstream_reads(tmp_path):
    lake = str(tmp_path / "elsewhere")
    pipeline = _pipeline(tmp_path, "nats+jetstream://h:4222?subject=x")

    defs = build_pipeline_definitions(
        pipeline, resources={"nilus_sink": DeltaSinkResource(lakehouse=lake)}
    )

    sink = defs.resources["nilus_sink"]
    assert isinstance(sink, SinkResource)
    assert defs.resources["nilus_io_manager"].sink is sink  # downstream reads where runs write
    call = engine_call(pipeline, sink=sink)
    assert call.pipeline.table_location(call.env).uri == str(tmp_path / "elsewhere/lake/a/b")
