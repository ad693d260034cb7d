"""``nilus-dagster validate``: one line per good pipeline, ``FILE: FIELD: message`` per problem."""

import re
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli

from nilus_dagster.cli import main

REPO = Path(__file__).resolve().parent.parent
PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+): (?P<field>[^:]+): (?P<message>\S.*)$")
SUMMARY_LINE = re.compile(r"^\d+ problem\(s\) in \d+ file\(s\)$")

GOOD = """\
name: {name}
spec:
  type: stream
  source:
    address: "{address}"
    options:
      source_table: orders-stream
  sink:
    address: dataos://{depot}?purpose=rw
    options:
      dest_table: analytics.{name_}
      incremental_strategy: append
  dagster:
    partitions_start: "2026-01-01"
"""


def manifest(name: str, address: str = "", depot: str = "lake") -> str:
    address = address or "nats+jetstream://localhost:4222?subject=orders.created"
    return GOOD.format(name=name, name_=name.replace("-", "_"), address=address, depot=depot)


def write(folder: Path, file: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text(text)
    return folder / file


def test_shipped_pipelines_validate() -> None:
    result = run_cli("validate", "pipelines", cwd=REPO)

    assert result.returncode == 0, result.stderr
    # The Nilus page's samples say nothing about Dagster partitions: warnings only.
    assert all(line.startswith("warn pipelines/") for line in result.stderr.splitlines())
    lines = result.stdout.splitlines()
    assert all(line.startswith("ok  pipelines/") for line in lines)
    by_file = {line.split(":")[0].removeprefix("ok  "): line for line in lines}
    # depots.example.yaml is skipped: it is not a pipeline.
    assert "pipelines/depots.example.yaml" not in by_file
    sample = by_file["pipelines/nats-orders-stream.yaml"]
    assert "nats-orders-stream: stream orders-stream subject orders.created" in sample
    assert "-> analytics.orders_stream (append) at " in sample
    assert sample.endswith(
        "orders-lakehouse/analytics/orders_stream; needs NATS_NKEYS_SEED at run time"
    )
    assert by_file["pipelines/orders-userpass.yaml"].endswith(
        "needs NATS_USERNAME, NATS_PASSWORD at run time"
    )
    assert "needs" not in by_file["pipelines/orders-local.yaml"]


def test_a_partitioned_pipeline_without_a_start_is_a_warning(tmp_path: Path) -> None:
    def without_start(text: str) -> str:
        return text.replace('  dagster:\n    partitions_start: "2026-01-01"\n', "")

    bare = write(tmp_path, "bare.yaml", without_start(manifest("bare")))
    timed = "nats+jetstream://localhost:4222?subject=orders.created&start_time=2026-05-01T08:00:00Z"
    write(tmp_path, "timed.yaml", without_start(manifest("timed", address=timed)))
    write(tmp_path, "dated.yaml", manifest("dated"))

    result = run_cli("validate", str(tmp_path))

    assert result.returncode == 0
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"warn {bare}: spec.dagster.partitions_start: not set")
    assert "add partitions_start: YYYY-MM-DD" in warning


def test_problems_exit_1_with_file_field_message_lines(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "bad.yaml",
        manifest("bad", "nats+jetstream://localhost:4222?subject=s&batch_size=0&timeot=5"),
    )
    broken = write(tmp_path, "broken.yaml", "name: x\nspec: [\n")
    write(tmp_path, "good.yaml", manifest("good"))

    result = run_cli("validate", str(tmp_path), cwd=REPO)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith(f"ok  {tmp_path / 'good.yaml'}: good: ")
    *problems, summary = result.stderr.splitlines()
    assert SUMMARY_LINE.match(summary)
    assert summary == "2 problem(s) in 2 file(s)"
    parsed = [PROBLEM_LINE.match(line) for line in problems]
    assert all(parsed), problems
    assert [(m["file"], m["field"]) for m in parsed] == [  # type: ignore[index]
        (str(bad), "spec.source.address.timeot"),
        (str(broken), "line 3, column 1"),
    ]
    assert "did you mean timeout?" in problems[0]
    assert "is not valid YAML" in problems[1]


def test_globs_and_files(tmp_path: Path) -> None:
    write(tmp_path / "a", "one.yaml", manifest("one"))
    write(tmp_path / "a", "two.yml", manifest("two"))
    three = write(tmp_path / "b", "three.yaml", manifest("three"))

    result = run_cli("validate", str(tmp_path / "a" / "*.y*ml"), str(three), cwd=REPO)

    assert result.returncode == 0, result.stderr
    names = [line.split(": ")[1] for line in result.stdout.splitlines()]
    assert names == ["one", "two", "three"]


def test_nothing_found_is_a_problem(tmp_path: Path) -> None:
    result = run_cli("validate", str(tmp_path / "*.yaml"), cwd=REPO)

    assert result.returncode == 1
    assert (
        result.stderr.splitlines()[0]
        == f"{tmp_path / '*.yaml'}: (files): matches no *.yaml or *.yml file"
    )


def test_depots_only_yaml_in_a_folder_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "depots.yaml", "depots:\n  lake:\n    root: ./lake\n")
    write(tmp_path, "orders.yaml", manifest("orders"))

    assert main(["validate", str(tmp_path)]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert len(out.splitlines()) == 1
    assert out.startswith(f"ok  {tmp_path / 'orders.yaml'}: orders: ")


def test_depots_file_resolves_and_unknown_depot_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    depots = write(tmp_path / "conf", "depots.yaml", "depots:\n  lake:\n    root: ../tables\n")
    write(tmp_path / "p", "known.yaml", manifest("known", depot="lake"))
    unknown = write(tmp_path / "p", "unknown.yaml", manifest("unknown", depot="warehouse"))
    monkeypatch.setenv("NILUS_DEPOTS", str(depots))

    assert main(["validate", str(tmp_path / "p")]) == 1

    out, err = capsys.readouterr()
    assert out.strip().endswith(f"at {tmp_path / 'tables' / 'analytics' / 'known'}")
    assert err.splitlines() == [
        f"{unknown}: spec.sink.address: depot 'warehouse' is not in the depots file {depots} "
        "(NILUS_DEPOTS; it has: lake): add it there or fix the depot name",
        "1 problem(s) in 1 file(s)",
    ]


def test_malformed_depots_file_is_named_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    depots = write(tmp_path, "depots.yml", "depots:\n  lake: [\n")
    write(tmp_path / "p", "a.yaml", manifest("a"))
    write(tmp_path / "p", "b.yaml", manifest("b"))
    monkeypatch.setenv("NILUS_DEPOTS", str(depots))

    assert main(["validate", str(tmp_path / "p")]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{depots}: line 3, column 1: is not valid YAML: expected the node content, but found "
        "'<stream end>'; fix the indentation or quoting",
        "1 problem(s) in 1 file(s)",
    ]


def test_literal_secrets_never_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = manifest("good", "nats+jetstream://bob:hunter2-literal@localhost:4222?subject=s")
    bad = (
        textwrap.dedent(good)
        .replace("name: good", "name: bad")
        .replace("incremental_strategy: append", "incremental_strategy: upsert")
    )
    write(tmp_path, "good.yaml", good)
    write(tmp_path, "bad.yaml", bad)

    assert main(["validate", str(tmp_path)]) == 1

    out, err = capsys.readouterr()
    assert "ok  " in out and "incremental_strategy" in err
    assert "hunter2-literal" not in out + err


def test_never_a_traceback_on_odd_input(tmp_path: Path) -> None:
    write(tmp_path, "binary.yaml", "")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00name")
    write(tmp_path, "date.yaml", "name: 2001-02-30\n")
    write(tmp_path, "deep.yaml", "[" * 5000)
    (tmp_path / "folder.yaml").mkdir()

    result = run_cli("validate", str(tmp_path), cwd=REPO)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    fields = [line.split(": ")[1] for line in result.stderr.splitlines()[:-1]]
    assert fields == ["(file)", "(file)", "(file)"]
