"""A user's Dagster project with Nilus pipelines merged in (tests/host_project): it loads with
`dagster asset list` and `dg`, keeps its own executor, resources and io_manager, and its
downstream assets read the Nilus table (a partitioned one exactly its window)."""

import contextlib
import os
import pickle
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
from nats.js.errors import NotFoundError

pytestmark = pytest.mark.slow

HOST = Path(__file__).resolve().parent / "host_project"
BIN = Path(sys.executable).parent
STREAM, SUBJECT = "HOST_ORDERS", "host.orders"
TODAY = datetime.now(timezone.utc).date()
YESTERDAY = TODAY - timedelta(days=1)


@pytest.fixture
def host_env(tmp_path, nats_server, publisher):
    with contextlib.suppress(NotFoundError):
        publisher.delete_stream(STREAM)  # left by an earlier test of this session
    publisher.create_stream(STREAM, ["host.>"])
    (tmp_path / "home").mkdir()
    return {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "HOST_STORAGE": str(tmp_path / "storage"),
        "NILUS_NATS_SERVERS": nats_server.hostport,
        "NILUS_LAKEHOUSE": str(tmp_path / "lake"),
        "PYTHONPATH": os.pathsep.join([str(HOST), os.environ.get("PYTHONPATH", "")]),
    }


def _run(env, *args, tool="dagster"):
    result = subprocess.run(
        [str(BIN / tool), *args],
        cwd=HOST,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"{tool} {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _materialize(env, selection, partition=None):
    args = ["asset", "materialize", "-m", "host_project.definitions", "--select", selection]
    return _run(env, *args, *(["--partition", str(partition)] if partition else []))


def _stored(env, *parts):
    return pickle.loads(Path(env["HOST_STORAGE"], *parts).read_bytes())


def test_host_project_loads_and_runs_nilus_next_to_its_own_assets(host_env, publisher):
    listed = _run(host_env, "asset", "list", "-m", "host_project.definitions").split()
    assert {"host_orders", "daily_orders", "order_count", "orders_audit", "unrelated"} <= set(
        listed
    )
    seqs = publisher.publish_orders(SUBJECT, 30)

    # The Nilus asset, then the downstream asset, in one run on the host's executor.
    _materialize(host_env, "host_orders,daily_orders", TODAY)
    _materialize(host_env, "daily_orders", YESTERDAY)
    _materialize(host_env, "unrelated,order_count")

    today = _stored(host_env, "daily_orders", str(TODAY))
    assert today["seqs"] == seqs
    assert today["window"][0].startswith(str(TODAY))
    assert _stored(host_env, "daily_orders", str(YESTERDAY))["seqs"] == []
    assert _stored(host_env, "order_count") == 30
    # The host's multiprocess executor ran the unrelated asset in a step process of its own.
    step = _stored(host_env, "unrelated")
    assert step["pid"] != os.getpid() and step["ppid"] != os.getpid()


def test_host_project_keeps_its_executor_and_the_pipeline_has_its_own_job(monkeypatch):
    monkeypatch.syspath_prepend(str(HOST))
    from host_project.definitions import defs

    definitions = defs()
    assert definitions.executor is not None
    implicit = definitions.resolve_implicit_global_asset_job_def()
    assert implicit.executor_def.name == "multiprocess"
    assert definitions.resolve_job_def("host_orders_job").executor_def.name == "in_process"
    assert set(definitions.resources) >= {"greeting", "io_manager", "nats", "nilus_sink"}
    spec = definitions.resolve_assets_def("host_orders").specs_by_key[dg.AssetKey("host_orders")]
    assert spec.group_name == "ingest"  # the component's translation


def test_host_project_through_dg(host_env):
    import json

    listed = json.loads(_run(host_env, "list", "defs", "--json", tool="dg"))

    assets = {a["asset_key"]: a for a in listed["assets"]}
    assert set(assets["host_orders"]["kinds"]) == {"nats", "deltalake"}
    assert assets["host_orders"]["dependency_keys"] == ["nats/HOST_ORDERS"]
    assert "host_orders" in assets["daily_orders"]["dependency_keys"]
    assert {j["name"] for j in listed["jobs"]} >= {"host_orders_job"}
