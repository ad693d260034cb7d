"""NilusPipelinesComponent: from attributes, and from a defs.yaml in a components project."""

from pathlib import Path

import dagster as dg
from conftest import write_pipeline_file
from dagster.components.testing import create_defs_folder_sandbox

from nilus_dagster.dagster import NatsResource, NilusPipelinesComponent, SinkResource


def test_component_from_attributes_builds_assets_sensors_and_resources(tmp_path):
    write_pipeline_file(tmp_path / "pipelines", "alpha", run_mode="per_tick")
    write_pipeline_file(tmp_path / "pipelines", "beta", run_mode="per_tick")

    component = NilusPipelinesComponent.from_attributes_dict(
        attributes={
            "pipelines": [str(tmp_path / "pipelines")],
            "nats": {"servers": ["n1:4222"], "password": {"env": "NATS_PASSWORD"}},
            "sink": {"lakehouse": str(tmp_path / "lake")},
        }
    )
    defs = dg.build_defs_for_component(component)
    repo = defs.get_repository_def()

    assert {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()} == {
        "alpha",
        "beta",
        "nats/ALPHA",
        "nats/BETA",
    }
    assert {s.name for s in repo.sensor_defs} == {"alpha_sensor", "beta_sensor"}
    nats = defs.resources["nats"]
    assert isinstance(nats, NatsResource)
    assert nats.servers == ["n1:4222"]
    # {env: NAME} is an EnvVar: read at run time, only its name is in the config.
    assert isinstance(nats.password, dg.EnvVar) and nats.password.env_var_name == "NATS_PASSWORD"
    assert defs.resources["nilus_sink"] == SinkResource(lakehouse=str(tmp_path / "lake"))


def test_component_in_a_defs_folder_resolves_paths_next_to_defs_yaml():
    with create_defs_folder_sandbox() as sandbox:
        defs_path = sandbox.scaffold_component(
            component_cls=NilusPipelinesComponent,
            defs_yaml_contents={
                "type": "nilus_dagster.dagster.NilusPipelinesComponent",
                "attributes": {
                    "pipelines": ["manifests"],
                    "sink": {"depots_file": "depots.yaml"},
                },
            },
        )
        write_pipeline_file(defs_path / "manifests", "gamma")
        (defs_path / "depots.yaml").write_text("depots: {lake: {root: ./lakehouse}}\n")

        with sandbox.load_component_and_build_defs(defs_path=defs_path) as (component, defs):
            assert isinstance(component, NilusPipelinesComponent)
            asset = defs.get_assets_def("gamma")
            assert asset.key == dg.AssetKey("gamma")
            sink = defs.resources["nilus_sink"]
            assert Path(sink.depots_file) == (defs_path / "depots.yaml").resolve()
            # The table location shown reflects the component's depots file.
            table_uri = asset.specs_by_key[asset.key].metadata["nilus/table_uri"].value
            assert table_uri == str((defs_path / "lakehouse" / "s" / "gamma").resolve())


def test_component_translation_and_resource_keys(tmp_path):
    write_pipeline_file(tmp_path / "pipelines", "alpha")

    component = NilusPipelinesComponent.from_attributes_dict(
        attributes={
            "pipelines": [str(tmp_path / "pipelines")],
            "translation": {"group_name": "ingest", "key_prefix": "{{ stream | lower }}"},
            "nats": {"servers": ["n1:4222"]},
            "resource_keys": {"nats": "nats_eu"},
        }
    )
    defs = dg.build_defs_for_component(component)

    asset = defs.resolve_assets_def(dg.AssetKey(["alpha", "alpha"]))
    spec = asset.specs_by_key[asset.key]
    assert spec.group_name == "ingest"
    assert spec.kinds == {"nats", "deltalake"}
    assert defs.resources["nats_eu"].servers == ["n1:4222"]
    assert "nats" not in defs.resources
