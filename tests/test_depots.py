"""Where a sink's Delta table lives: NILUS_DEPOTS files, NILUS_LAKEHOUSE, direct roots."""

import uuid
from pathlib import Path

import pytest

from nilus_dagster.errors import ManifestError, PlaceholderError, Problem
from nilus_dagster.manifest import Pipeline, TableLocation, parse_pipeline
from nilus_dagster.manifest.depots import load_depots
from nilus_dagster.redaction import redact

# Values filled or registered here must not mask text in other tests.
pytestmark = pytest.mark.usefixtures("isolated_secrets")

REPO = Path(__file__).resolve().parent.parent

MANIFEST = """\
name: located
spec:
  type: stream
  source:
    address: nats+jetstream://localhost:4222?subject=s
    options:
      source_table: orders-stream
  sink:
    address: {sink}
    options:
      dest_table: {dest_table}
"""


def pipeline(
    tmp_path: Path,
    sink: str = "dataos://orders-lakehouse?purpose=rw",
    dest_table: str = "analytics.orders",
) -> Pipeline:
    path = tmp_path / "manifests" / "located.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(MANIFEST.format(sink=sink, dest_table=dest_table))
    return parse_pipeline(path)


def depots_file(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "depots.yaml"
    path.write_text(text)
    return path


def test_no_depots_file_uses_the_lakehouse_folder(tmp_path: Path) -> None:
    # conftest points NILUS_LAKEHOUSE at tmp_path / "lakehouse".
    location = pipeline(tmp_path).table_location()

    assert location == TableLocation(
        str(tmp_path / "lakehouse" / "orders-lakehouse" / "analytics" / "orders"), {}
    )
    assert location.is_local


def test_default_lakehouse_is_dot_lakehouse_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NILUS_LAKEHOUSE")
    monkeypatch.chdir(tmp_path)

    location = pipeline(tmp_path).table_location()

    assert location.uri == str(
        tmp_path / ".lakehouse" / "orders-lakehouse" / "analytics" / "orders"
    )


def test_relative_local_root_is_relative_to_the_depots_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    depots = depots_file(tmp_path / "conf", "depots:\n  orders-lakehouse:\n    root: ../tables\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    location = pipeline(tmp_path).table_location({"NILUS_DEPOTS": str(depots)})

    assert location.uri == str(tmp_path / "tables" / "analytics" / "orders")
    assert location.storage_options == {}


def test_relative_depots_path_is_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    depots_file(tmp_path / "conf", "depots:\n  orders-lakehouse:\n    root: file://lake\n")
    monkeypatch.chdir(tmp_path)

    location = pipeline(tmp_path).table_location({"NILUS_DEPOTS": "conf/depots.yaml"})

    assert location.uri == str(tmp_path / "conf" / "lake" / "analytics" / "orders")


def test_s3_root_with_storage_options_filled_at_run_time(tmp_path: Path) -> None:
    depots = depots_file(
        tmp_path,
        "depots:\n"
        "  orders-lakehouse:\n"
        "    root: s3://analytics-lake/nilus/\n"
        "    storage_options:\n"
        "      AWS_REGION: eu-west-1\n"
        '      AWS_ACCESS_KEY_ID: "{AWS_ACCESS_KEY_ID}"\n'
        '      AWS_SECRET_ACCESS_KEY: "{AWS_SECRET_ACCESS_KEY}"\n'
        "      AWS_ALLOW_HTTP: true\n",
    )
    located = pipeline(tmp_path)
    secret = f"aws-{uuid.uuid4().hex}"
    env = {
        "NILUS_DEPOTS": str(depots),
        "AWS_ACCESS_KEY_ID": "AKIA1",
        "AWS_SECRET_ACCESS_KEY": secret,
    }

    as_written = located.table_location(env, fill_secrets=False)
    filled = located.table_location(env)

    assert as_written.uri == filled.uri == "s3://analytics-lake/nilus/analytics/orders"
    assert not filled.is_local
    assert as_written.storage_options == {
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "{AWS_ACCESS_KEY_ID}",
        "AWS_SECRET_ACCESS_KEY": "{AWS_SECRET_ACCESS_KEY}",
        "AWS_ALLOW_HTTP": "true",
    }
    assert filled.storage_options == {
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIA1",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ALLOW_HTTP": "true",
    }
    assert redact(f"403 for {secret}") == "403 for ***"


def test_unset_storage_option_variable_names_the_depots_file(tmp_path: Path) -> None:
    depots = depots_file(
        tmp_path,
        "depots:\n  orders-lakehouse:\n    root: s3://b\n"
        '    storage_options:\n      KEY: "{MISSING_KEY}"\n',
    )
    located = pipeline(tmp_path)

    with pytest.raises(PlaceholderError) as caught:
        located.table_location({"NILUS_DEPOTS": str(depots)})

    assert str(caught.value).startswith(
        f"{depots}: depots.orders-lakehouse.storage_options.KEY (for {located.path}): "
        "environment variable MISSING_KEY is not set"
    )


def test_storage_option_from_the_projection(tmp_path: Path) -> None:
    depots = depots_file(
        tmp_path,
        "depots:\n  orders-lakehouse:\n    root: s3://b\n"
        '    storage_options:\n      TOKEN: "{T}"\n',
    )
    path = tmp_path / "p.yaml"
    text = MANIFEST.format(sink="dataos://orders-lakehouse", dest_table="analytics.orders")
    path.write_text(
        text.replace(
            "  source:",
            "  use:\n    projection:\n      projections:\n        envVars:\n"
            "          - key: T\n            value: projected\n  source:",
        )
    )

    location = parse_pipeline(path).table_location({"NILUS_DEPOTS": str(depots)})

    assert location.storage_options == {"TOKEN": "projected"}


def test_unknown_depot(tmp_path: Path) -> None:
    depots = depots_file(tmp_path, "depots:\n  a:\n    root: /x\n  b:\n    root: /y\n")
    located = pipeline(tmp_path, "dataos://c?purpose=rw")

    with pytest.raises(ManifestError) as caught:
        located.table_location({"NILUS_DEPOTS": str(depots)})

    assert caught.value.problems == [
        Problem(
            str(located.path),
            "spec.sink.address",
            f"depot 'c' is not in the depots file {depots} (NILUS_DEPOTS; it has: a, b): "
            "add it there or fix the depot name",
        )
    ]


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("depots: [\n", "line 2, column 1", "is not valid YAML"),
        ("", "depots", "is missing or not a mapping: a depots file holds depots: {<depot>:"),
        ("lake:\n  root: /x\n", "depots", "is missing or not a mapping"),
        ("depots: [a]\n", "depots", "is missing or not a mapping"),
        ("depots:\n  lake: /x\n", "depots.lake", "must be a mapping: {root: <URI or folder>}"),
        ("depots:\n  lake: {}\n", "depots.lake.root", "is required: the storage root"),
        (
            "depots:\n  lake:\n    root: /x\n    region: eu\n",
            "depots.lake.region",
            "is not a known key of a delta depot; it has type, root, storage_options",
        ),
        (
            "depots:\n  lake:\n    root: /x\n    storage_options: [a]\n",
            "depots.lake.storage_options",
            "must be a mapping of text",
        ),
        (
            "depots:\n  lake:\n    root: /x\n    storage_options:\n      KEY:\n",
            "depots.lake.storage_options.KEY",
            'must be text (quote it; a secret goes in as "{',
        ),
    ],
)
def test_malformed_depots_file(tmp_path: Path, text: str, field: str, message: str) -> None:
    depots = depots_file(tmp_path, text)

    with pytest.raises(ManifestError) as caught:
        load_depots(depots)

    (problem,) = caught.value.problems
    assert (problem.file, problem.field) == (str(depots), field)
    assert message in problem.message


def test_missing_depots_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"\(file\): cannot read the depots file"):
        pipeline(tmp_path).table_location({"NILUS_DEPOTS": str(tmp_path / "nope.yaml")})


def test_every_depot_problem_is_listed(tmp_path: Path) -> None:
    depots = depots_file(tmp_path, "depots:\n  a: {}\n  b: 5\n  c:\n    root: /ok\n")

    with pytest.raises(ManifestError) as caught:
        load_depots(depots)

    assert [p.field for p in caught.value.problems] == ["depots.a.root", "depots.b"]


def test_shipped_depots_example(tmp_path: Path) -> None:
    depots = load_depots(REPO / "pipelines" / "depots.example.yaml")

    assert depots["orders-lakehouse"].root == str(REPO / ".lakehouse" / "orders-lakehouse")
    assert depots["s3-lakehouse"].root == "s3://analytics-lake/nilus"
    assert (
        depots["s3-lakehouse"].storage_options["AWS_SECRET_ACCESS_KEY"] == "{AWS_SECRET_ACCESS_KEY}"
    )


@pytest.mark.parametrize(
    ("sink", "uri"),
    [
        ("s3://bucket/prefix/", "s3://bucket/prefix/analytics/orders"),
        ("gs://bucket", "gs://bucket/analytics/orders"),
        ("az://container/x", "az://container/x/analytics/orders"),
    ],
)
def test_direct_storage_roots(tmp_path: Path, sink: str, uri: str) -> None:
    location = pipeline(tmp_path, sink).table_location()

    assert location == TableLocation(uri, {})


def test_direct_local_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    relative = pipeline(tmp_path, "./lake").table_location()
    file_uri = pipeline(tmp_path, f"file://{tmp_path}/other").table_location()

    assert relative.uri == str(tmp_path / "lake" / "analytics" / "orders")
    assert file_uri.uri == str(tmp_path / "other" / "analytics" / "orders")


def test_dead_letter_sibling() -> None:
    location = TableLocation("s3://b/analytics/orders/", {"K": "v"})

    assert location.sibling("__dead_letters") == TableLocation(
        "s3://b/analytics/orders__dead_letters", {"K": "v"}
    )


S3_DEPOT = (
    "depots:\n"
    "  orders-lakehouse:\n"
    "    root: s3://analytics-lake/nilus\n"
    "    storage_options:\n"
    '      AWS_ACCESS_KEY_ID: "{LAKE_KEY}"\n'
    '      AWS_SECRET_ACCESS_KEY: "{LAKE_SECRET}"\n'
    "      AWS_REGION: eu-west-1\n"
)


def test_a_fully_qualified_dest_table_is_the_table_location(tmp_path: Path) -> None:
    depots = depots_file(tmp_path, S3_DEPOT)
    located = pipeline(tmp_path, dest_table="s3://other-bucket/raw/orders/")
    env = {"NILUS_DEPOTS": str(depots), "LAKE_KEY": "AKIA2", "LAKE_SECRET": "s3cr3t-value"}

    location = located.table_location(env)
    options = located.manifest.sink.options

    # Not under the depot's root: the location is the table; the depot gives the credentials.
    assert location.uri == "s3://other-bucket/raw/orders"
    assert location.storage_options["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    assert location.sibling("__dead_letters").uri == "s3://other-bucket/raw/orders__dead_letters"
    assert (options.schema_name, options.table_name) == ("raw", "orders")
    assert options.qualified_name == "raw.orders"
    assert location.options_source == (
        f"{depots}: depots.orders-lakehouse.storage_options (AWS_ACCESS_KEY_ID from {{LAKE_KEY}}; "
        "AWS_SECRET_ACCESS_KEY from {LAKE_SECRET})"
    )


def test_an_absolute_path_dest_table_is_a_local_table(tmp_path: Path) -> None:
    table = tmp_path / "tables" / "orders"

    location = pipeline(tmp_path, dest_table=str(table)).table_location()
    file_uri = pipeline(tmp_path, dest_table=f"file://{table}").table_location()

    assert location.uri == file_uri.uri == str(table)
    assert location.is_local


@pytest.mark.parametrize(
    ("depots_text", "dest_table", "words"),
    [
        (None, "s3://lake/x/orders", "'s3://lake/x/orders' is on S3, but the sink's storage root"),
        (S3_DEPOT, "/data/lake/orders", "'/data/lake/orders' is on a local folder, but the sink"),
        (S3_DEPOT, "gs://lake/x/orders", "is on Google Cloud Storage, but the sink's storage root"),
    ],
)
def test_a_dest_table_location_on_another_store_than_the_depot_is_refused(
    tmp_path: Path, depots_text: str | None, dest_table: str, words: str
) -> None:
    env = {"LAKE_KEY": "k", "LAKE_SECRET": "s"}
    if depots_text:
        env["NILUS_DEPOTS"] = str(depots_file(tmp_path, depots_text))
    located = pipeline(tmp_path, dest_table=dest_table)

    with pytest.raises(ManifestError) as caught:
        located.table_location(env)

    (problem,) = caught.value.problems
    assert (problem.file, problem.field) == (str(located.path), "spec.sink.options.dest_table")
    assert words in problem.message
    assert "address a depot whose root is on the same store" in problem.message


def test_a_literal_secret_storage_option_is_redacted(tmp_path: Path) -> None:
    secret = f"literal-{uuid.uuid4().hex}"
    depots = depots_file(
        tmp_path,
        "depots:\n  orders-lakehouse:\n    root: s3://b\n"
        f"    storage_options:\n      AWS_SECRET_ACCESS_KEY: {secret}\n      AWS_REGION: eu\n",
    )

    pipeline(tmp_path).table_location({"NILUS_DEPOTS": str(depots)})

    assert redact(f"refused {secret}") == "refused ***"
    assert redact("region eu") == "region eu"


def test_a_dest_table_location_is_refused_for_postgresql(tmp_path: Path) -> None:
    located = pipeline(
        tmp_path, "postgresql://nilus@127.0.0.1:5432/analytics", "s3://lake/raw/orders"
    )

    with pytest.raises(ManifestError) as caught:
        located.table_location()

    (problem,) = caught.value.problems
    assert problem.field == "spec.sink.options.dest_table"
    assert "a PostgreSQL table is named <schema>.<table>" in problem.message
