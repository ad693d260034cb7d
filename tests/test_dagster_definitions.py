"""Definitions from a folder of manifests, the bad-manifest policy, and the root entry point."""

import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from conftest import write_pipeline_file

from nilus_dagster.dagster import (
    NatsResource,
    NilusResourceKeys,
    build_nilus_definitions,
    build_pipeline_definitions,
    default_resources,
)
from nilus_dagster.errors import ManifestError

REPO = Path(__file__).resolve().parents[1]


def _bad(folder: Path) -> Path:
    path = folder / "broken.yaml"
    path.write_text(
        "name: broken\nspec:\n  type: stream\n  source:\n"
        "    address: nats+jetstream://h?subject=x&batch_size=0\n"
        "    options: {source_table: S}\n"
    )
    return path


def test_every_manifest_becomes_an_asset_and_a_sensor(tmp_path):
    folder = tmp_path / "pipelines"
    write_pipeline_file(folder, "alpha", query="&timeout=3", run_mode="per_tick")
    write_pipeline_file(folder / "nested", "beta", run_in_loop=False)
    write_pipeline_file(folder, "gamma")  # run_in_loop: true -> a service run by default
    (folder / "depots.yaml").write_text("depots: {lake: {root: /tmp/x}}\n")

    defs = build_nilus_definitions(folder)
    repo = defs.get_repository_def()

    # Each pipeline's stream is its upstream external asset.
    assert {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()} == {
        "alpha",
        "beta",
        "gamma",
        "nats/ALPHA",
        "nats/BETA",
        "nats/GAMMA",
    }
    assert repo.asset_graph.get(dg.AssetKey("alpha")).parent_keys == {
        dg.AssetKey(["nats", "ALPHA"])
    }
    alpha, beta = repo.get_sensor_def("alpha_sensor"), repo.get_sensor_def("beta_sensor")
    assert alpha.default_status == dg.DefaultSensorStatus.RUNNING
    assert beta.default_status == dg.DefaultSensorStatus.STOPPED
    assert alpha.minimum_interval_seconds == 3
    assert beta.minimum_interval_seconds == 10  # the address's default timeout
    assert set(defs.resources) == {"nats", "nilus_sink", "nilus_io_manager"}
    # Nothing for the whole code location: each pipeline's runs go through its own job.
    assert defs.executor is None
    job = repo.get_job("alpha_job")
    assert job.executor_def.name == "in_process"
    assert alpha.job_name == "alpha_job"
    supervisor = repo.get_sensor_def("nilus_service_nilus_supervisor")
    assert supervisor.default_status == dg.DefaultSensorStatus.RUNNING
    assert supervisor.job_name == "nilus_service_nilus"
    assert {s.name for s in repo.sensor_defs} == {
        "alpha_sensor",
        "beta_sensor",
        "nilus_service_nilus_supervisor",
    }


def test_service_pipelines_are_grouped_and_bounded_per_run(tmp_path):
    folder = tmp_path / "pipelines"
    for name in ("a1", "a2", "a3"):
        path = write_pipeline_file(folder, name)
        path.write_text(
            path.read_text() + "  dagster: {group: fleet, service: {max_pipelines: 2}}\n"
        )
    write_pipeline_file(folder, "b1")

    repo = build_nilus_definitions(folder).get_repository_def()

    jobs = {j.name for j in repo.get_all_jobs() if j.name.startswith("nilus_service_")}
    assert jobs == {"nilus_service_fleet", "nilus_service_fleet_2", "nilus_service_nilus"}
    assert not any(s.name.endswith("_sensor") for s in repo.sensor_defs)


def test_sensor_interval_can_be_set_in_spec_dagster(tmp_path):
    path = write_pipeline_file(tmp_path, "gamma")
    path.write_text(
        path.read_text() + "  dagster: {sensor_interval_seconds: 42, run_mode: per_tick}\n"
    )

    sensor = build_pipeline_definitions(path).get_repository_def().get_sensor_def("gamma_sensor")

    assert sensor.minimum_interval_seconds == 42


def test_a_bad_manifest_is_skipped_and_logged_the_others_load(tmp_path, caplog):
    folder = tmp_path / "pipelines"
    write_pipeline_file(folder, "alpha")
    bad = _bad(folder)

    with caplog.at_level(logging.WARNING, logger="nilus_dagster.dagster"):
        defs = build_nilus_definitions(folder)

    keys = defs.get_repository_def().asset_graph.get_all_asset_keys()
    assert keys == {dg.AssetKey("alpha"), dg.AssetKey(["nats", "ALPHA"])}
    assert f"{bad}: spec.sink: is required" in caplog.text
    assert "spec.source.address.batch_size" in caplog.text
    assert "nilus-dagster validate" in caplog.text
    assert str(bad) in defs.metadata["nilus/skipped_manifests"].value


def test_spec_dagster_settings_dagster_refuses_are_skipped_too(tmp_path, caplog):
    path = write_pipeline_file(tmp_path, "delta")
    path.write_text(path.read_text() + "  dagster: {partitions_start: 'not a date'}\n")

    with caplog.at_level(logging.WARNING, logger="nilus_dagster.dagster"):
        defs = build_nilus_definitions(tmp_path)

    assert not defs.get_repository_def().asset_graph.get_all_asset_keys()
    assert f"{path}: spec.dagster:" in caplog.text


def test_on_invalid_fail_raises_with_every_problem(tmp_path):
    write_pipeline_file(tmp_path, "alpha")
    bad = _bad(tmp_path)

    with pytest.raises(ManifestError) as raised:
        build_nilus_definitions(tmp_path, on_invalid="fail")

    assert str(bad) in str(raised.value)


def test_resources_can_be_overridden_and_per_pipeline_defs_merge(tmp_path):
    nats = NatsResource(servers=["other:4222"])
    defs = build_nilus_definitions(
        [write_pipeline_file(tmp_path, "alpha"), write_pipeline_file(tmp_path, "beta")],
        resources={"nats": nats},
    )
    merged = dg.Definitions.merge(
        build_pipeline_definitions(write_pipeline_file(tmp_path / "a", "one")),
        build_pipeline_definitions(write_pipeline_file(tmp_path / "b", "two")),
    )

    assert defs.resources["nats"] is nats
    assert defs.resources["nilus_sink"] is default_resources()["nilus_sink"]
    assert len(merged.get_repository_def().asset_graph.get_all_asset_keys()) == 4  # + 2 streams


def test_root_definitions_module_loads_the_repo_pipelines(monkeypatch):
    monkeypatch.delenv("NILUS_PIPELINES", raising=False)
    defs = runpy.run_path(str(REPO / "definitions.py"))["defs"]

    keys = {k.to_user_string() for k in defs.get_repository_def().asset_graph.get_all_asset_keys()}
    shipped = {p.stem for p in (REPO / "pipelines").glob("*.yaml") if p.stem != "depots.example"}
    assert {key for key in keys if not key.startswith("nats/")} == shipped


def test_dagster_asset_list_cli_with_nilus_pipelines(tmp_path):
    folder = tmp_path / "pipelines"
    write_pipeline_file(folder, "alpha")
    write_pipeline_file(folder, "beta")
    _bad(folder)
    env = {**os.environ, "NILUS_PIPELINES": str(folder)}

    result = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "list", "-f", str(REPO / "definitions.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alpha", "beta"]  # the streams are external
    assert "broken.yaml: spec.sink: is required" in result.stderr


def test_two_deployments_merge_into_a_project_without_conflicts(tmp_path):
    # Two pipelines reading one stream, from two builder calls with their own resource keys.
    eu = write_pipeline_file(tmp_path / "eu", "orders-eu")
    us = write_pipeline_file(tmp_path / "us", "orders-us", run_mode="per_tick")
    us.write_text(us.read_text().replace("ORDERS-US", "ORDERS-EU"))
    write_pipeline_file(tmp_path / "us", "returns-us")  # a service pipeline in each deployment
    host_io = dg.FilesystemIOManager(base_dir=str(tmp_path / "storage"))

    @dg.asset
    def unrelated() -> int:
        return 1

    merged = dg.Definitions.merge(
        dg.Definitions(
            assets=[unrelated],
            resources={"io_manager": host_io},
            executor=dg.multiprocess_executor,
        ),
        build_nilus_definitions(eu),
        build_nilus_definitions(
            tmp_path / "us",
            resources={"nats_us": NatsResource(servers=["us:4222"])},
            resource_keys=NilusResourceKeys(nats="nats_us", sink="sink_us", io_manager="io_us"),
        ),
    )
    repo = merged.get_repository_def()

    stream = dg.AssetKey(["nats", "ORDERS-EU"])
    assert repo.asset_graph.get(dg.AssetKey("orders-eu")).parent_keys == {stream}
    assert repo.asset_graph.get(dg.AssetKey("orders-us")).parent_keys == {stream}
    assert merged.resources["io_manager"] is host_io
    assert merged.resources["nats_us"].servers == ["us:4222"]
    assert repo.get_job("orders_us_job").executor_def.name == "in_process"
    assert merged.resolve_implicit_global_asset_job_def().executor_def.name == "multiprocess"
    assert repo.get_sensor_def("orders_us_sensor").required_resource_keys == {"nats_us", "sink_us"}
    # Each deployment's service run, under its own name and resources.
    assert repo.get_sensor_def("nilus_service_nilus_supervisor").required_resource_keys == {
        "nats",
        "nilus_sink",
    }
    supervisor = repo.get_sensor_def("nilus_service_nilus_nats_us_supervisor")
    assert supervisor.required_resource_keys == {"nats_us", "sink_us"}
