"""Iceberg depots: ``type: iceberg``, the catalog (embedded default, placeholders, errors)."""

from pathlib import Path

import pytest

from nilus_dagster.errors import ManifestError, PlaceholderError
from nilus_dagster.manifest.depots import load_depots, resolve_table_location
from nilus_dagster.manifest.model import Sink
from nilus_dagster.redaction import redact

REPO = Path(__file__).resolve().parent.parent


def _depots(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "depots.yaml"
    path.write_text(text)
    return path


def _sink() -> Sink:
    return Sink.model_validate(
        {"address": "dataos://lake?purpose=rw", "options": {"dest_table": "analytics.orders"}}
    )


def test_a_local_iceberg_depot_gets_the_embedded_sqlite_catalog(tmp_path: Path) -> None:
    path = _depots(tmp_path, "depots:\n  lake: {type: iceberg, root: ice}\n")
    location = resolve_table_location(_sink(), {"NILUS_DEPOTS": str(path)})
    assert location.kind == "iceberg"
    assert location.uri == str(tmp_path / "ice" / "analytics" / "orders")
    assert location.table == "analytics.orders"
    assert location.catalog == {"uri": f"sqlite:///{tmp_path / 'ice' / 'catalog.db'}"}


def test_catalog_placeholders_are_filled_at_run_time_only(isolated_secrets, tmp_path: Path) -> None:
    path = _depots(
        tmp_path,
        "depots:\n  lake:\n    type: iceberg\n    root: s3://b/ice\n    catalog:\n"
        '      uri: "postgresql+psycopg2://u:{PG_PASSWORD}@pg:5432/cat"\n',
    )
    env = {"NILUS_DEPOTS": str(path)}
    shown = resolve_table_location(_sink(), env, fill_secrets=False)
    assert shown.catalog["uri"] == "postgresql+psycopg2://u:{PG_PASSWORD}@pg:5432/cat"
    with pytest.raises(PlaceholderError, match="PG_PASSWORD"):
        resolve_table_location(_sink(), env)
    filled = resolve_table_location(_sink(), {**env, "PG_PASSWORD": "pa55-word-x"})
    assert filled.catalog["uri"] == "postgresql+psycopg2://u:pa55-word-x@pg:5432/cat"
    assert "pa55-word-x" not in redact(f"error talking to {filled.catalog['uri']}")


@pytest.mark.parametrize(
    ("entry", "field", "words"),
    [
        ("{type: iceberg, root: s3://b/x}", "depots.lake.catalog", "is required"),
        ("{type: hudi, root: x}", "depots.lake.type", "must be one of delta, iceberg, postgresql"),
        ("{root: x, catalog: {uri: 'sqlite:///c.db'}}", "depots.lake.catalog", "delta depot"),
        ("{type: iceberg, root: x, catalog: [a]}", "depots.lake.catalog", "must be a mapping"),
        ("{type: iceberg, root: x, catalog: {warehouse: w}}", "depots.lake.catalog.uri", "URL"),
    ],
)
def test_bad_iceberg_depots_name_the_field(
    tmp_path: Path, entry: str, field: str, words: str
) -> None:
    path = _depots(tmp_path, f"depots:\n  lake: {entry}\n")
    with pytest.raises(ManifestError) as caught:
        load_depots(path)
    [problem] = caught.value.problems
    assert (problem.file, problem.field) == (str(path), field)
    assert words in problem.message


def test_shipped_example_has_an_iceberg_depot() -> None:
    depots = load_depots(REPO / "pipelines" / "depots.example.yaml")
    iceberg = depots["iceberg-lakehouse"]
    assert (iceberg.type, iceberg.root) == ("iceberg", "s3://analytics-lake/iceberg")
    assert "{PG_PASSWORD}" in iceberg.catalog["uri"]
    assert depots["s3-lakehouse"].type == "delta"
