"""`dg scaffold defs` of the component writes a defs.yaml and a sample manifest that load, and
`dg check yaml` validates the component's typed attributes."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

DG = str(Path(sys.executable).parent / "dg")
COMPONENT = "nilus_dagster.dagster.NilusPipelinesComponent"


def _project(root: Path) -> Path:
    """An empty `dg` project named proj."""
    (root / "proj" / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[project]\nname = "proj"\nversion = "0"\n\n[tool.dg]\ndirectory_type = "project"\n\n'
        '[tool.dg.project]\nroot_module = "proj"\n'
    )
    (root / "proj" / "__init__.py").write_text("")
    (root / "proj" / "defs" / "__init__.py").write_text("")
    return root


def _dg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DG, *args], cwd=root, capture_output=True, text=True, timeout=180, check=False
    )


def test_scaffold_writes_a_working_defs_yaml_and_sample_and_check_yaml_validates(
    tmp_path, monkeypatch
):
    root = _project(tmp_path / "project")
    scaffolded = _dg(root, "scaffold", "defs", COMPONENT, "ingest")
    assert scaffolded.returncode == 0, scaffolded.stderr
    folder = root / "proj" / "defs" / "ingest"
    assert COMPONENT in (folder / "defs.yaml").read_text()
    assert (folder / "pipelines" / "orders.yaml").exists()

    # A misspelt and a mistyped field in another defs folder: dg names where.
    bad = root / "proj" / "defs" / "bad"
    bad.mkdir()
    (bad / "defs.yaml").write_text(
        f"type: {COMPONENT}\nattributes:\n  nats:\n    servrs: [a:4222]\n"
    )
    good = _dg(root, "check", "yaml", str(folder))
    wrong = _dg(root, "check", "yaml", str(bad))
    assert good.returncode == 0, good.stdout + good.stderr
    assert wrong.returncode == 1
    assert "bad/defs.yaml:3" in wrong.stdout + wrong.stderr
    assert "attributes.nats" in wrong.stdout + wrong.stderr

    # The scaffolded folder loads: the sample pipeline, its stream, job and sensor.
    monkeypatch.syspath_prepend(str(root))
    (bad / "defs.yaml").unlink()
    defs = dg.load_from_defs_folder(path_within_project=root / "proj")
    repo = defs.get_repository_def()
    assert {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()} == {
        "orders",
        "nats/orders-stream",
    }
    # The sample says run_in_loop: true, so a service run keeps it fresh.
    assert repo.has_sensor_def("nilus_service_nilus_supervisor")
    assert repo.has_job("nilus_service_nilus")
    partitions = repo.assets_defs_by_key[dg.AssetKey("orders")].partitions_def
    assert partitions.get_first_partition_key() is not None
