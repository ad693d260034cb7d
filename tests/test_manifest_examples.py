"""Every example on the Nilus NATS page parses to exactly the values the page documents."""

import textwrap
from pathlib import Path

import pytest

from nilus_dagster.manifest import Pipeline, collect_pipelines, parse_pipeline

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"

# The page's blocks, verbatim.
PAGE_LOCAL = """\
source:
  address: nats+jetstream://localhost:4222?subject=orders.created&batch_size=500&timeout=10
  options:
    source_table: orders-stream
    run_in_loop: true
"""
PAGE_USERPASS = """\
source:
  address: nats+jetstream://{NATS_USERNAME}:{NATS_PASSWORD}@nats.prod:4222?subject=orders.created&durable=nilus-orders&batch_size=1000&timeout=30
  options:
    source_table: orders-stream
    run_in_loop: true
"""
PAGE_TOKEN = """\
source:
  address: nats+jetstream://nats.prod:4222?subject=orders.created&token={NATS_TOKEN}&batch_size=1000&timeout=30
  options:
    source_table: orders-stream
    run_in_loop: true
"""
# The page's other token form (token as userinfo), in the same example.
PAGE_TOKEN_USERINFO = """\
source:
  address: nats+jetstream://{NATS_TOKEN}@nats.prod:4222?subject=orders.created&batch_size=1000&timeout=30
  options:
    source_table: orders-stream
    run_in_loop: true
"""
PAGE_NKEYS = """\
source:
  address: nats+jetstream://nats.prod:4222?subject=orders.created&nkeys_seed={NATS_NKEYS_SEED}&batch_size=1000&timeout=30
  options:
    source_table: orders-stream
    run_in_loop: true
"""
PAGE_SINK = """\
sink:
  address: dataos://orders-lakehouse?purpose=rw
  options:
    dest_table: analytics.orders_stream
    incremental_strategy: append
"""
PAGE_SAMPLE = """\
name: nats-orders-stream
version: v1alpha
type: nilus
tags:
  - nilus-stream
description: Stream NATS+JetStream orders into the lakehouse.
spec:
  type: stream
  compute: universe-compute
  source:
    address: nats+jetstream://nats.prod:4222?subject=orders.created&durable=nilus-orders&batch_size=1000&timeout=30&nkeys_seed={NATS_NKEYS_SEED}
    options:
      source_table: orders-stream
      run_in_loop: true
  sink:
    address: dataos://orders-lakehouse?purpose=rw
    options:
      dest_table: analytics.orders_stream
      incremental_strategy: append
"""


def _around(source: str, sink: str = PAGE_SINK, name: str = "example") -> str:
    """A whole manifest around the page's source and sink blocks."""
    head = f"name: {name}\nversion: v1alpha\ntype: nilus\nspec:\n  type: stream\n"
    return head + textwrap.indent(source, "  ") + textwrap.indent(sink, "  ")


def _parse(text: str, name: str = "example.yaml") -> Pipeline:
    return parse_pipeline(name, text)


def _assert_page_sink(pipeline: Pipeline) -> None:
    sink = pipeline.manifest.sink
    assert sink.address.depot == "orders-lakehouse"
    assert sink.address.params == (("purpose", "rw"),)
    assert sink.options.dest_table == "analytics.orders_stream"
    assert (sink.options.schema_name, sink.options.table_name) == ("analytics", "orders_stream")
    assert sink.options.incremental_strategy == "append"
    assert sink.options.primary_key is None
    assert sink.options.create_table is True


def _assert_page_source(
    pipeline: Pipeline,
    *,
    servers: tuple[str, ...],
    durable: str | None,
    batch_size: int,
    timeout: int,
    auth_mode: str,
    credentials: tuple[str | None, str | None, str | None, str | None],
    placeholders: list[str],
) -> None:
    """The page's source block as parsed; ``credentials`` is (user, password, token, nkeys_seed)."""
    address = pipeline.manifest.source.address
    options = pipeline.manifest.source.options

    assert address.servers == servers
    assert address.subject == pipeline.subject == "orders.created"
    assert address.durable == durable
    assert address.batch_size == batch_size
    assert address.timeout == timeout
    assert options.source_table == pipeline.stream == "orders-stream"
    assert options.run_in_loop is True
    assert address.auth_mode == auth_mode
    assert (address.user, address.password, address.token, address.nkeys_seed) == credentials
    assert address.placeholders() == placeholders
    _assert_page_sink(pipeline)


def test_local_dev_cluster_no_auth() -> None:
    _assert_page_source(
        _parse(_around(PAGE_LOCAL)),
        servers=("localhost:4222",),
        durable=None,
        batch_size=500,
        timeout=10,
        auth_mode="none",
        credentials=(None, None, None, None),
        placeholders=[],
    )


def test_username_password_durable() -> None:
    _assert_page_source(
        _parse(_around(PAGE_USERPASS)),
        servers=("nats.prod:4222",),
        durable="nilus-orders",
        batch_size=1000,
        timeout=30,
        auth_mode="user/password",
        credentials=("{NATS_USERNAME}", "{NATS_PASSWORD}", None, None),
        placeholders=["NATS_USERNAME", "NATS_PASSWORD"],
    )


@pytest.mark.parametrize("block", [PAGE_TOKEN, PAGE_TOKEN_USERINFO], ids=["query", "userinfo"])
def test_token(block: str) -> None:
    _assert_page_source(
        _parse(_around(block)),
        servers=("nats.prod:4222",),
        durable=None,
        batch_size=1000,
        timeout=30,
        auth_mode="token",
        credentials=(None, None, "{NATS_TOKEN}", None),
        placeholders=["NATS_TOKEN"],
    )


def test_both_token_forms_give_one_model() -> None:
    query = _parse(_around(PAGE_TOKEN)).manifest
    userinfo = _parse(_around(PAGE_TOKEN_USERINFO)).manifest

    assert query == userinfo


def test_nkeys_seed() -> None:
    _assert_page_source(
        _parse(_around(PAGE_NKEYS)),
        servers=("nats.prod:4222",),
        durable=None,
        batch_size=1000,
        timeout=30,
        auth_mode="nkeys",
        credentials=(None, None, None, "{NATS_NKEYS_SEED}"),
        placeholders=["NATS_NKEYS_SEED"],
    )


def test_sample_nilus_config() -> None:
    pipeline = _parse(PAGE_SAMPLE, "nats-orders-stream.yaml")
    manifest = pipeline.manifest

    assert manifest.name == pipeline.name == "nats-orders-stream"
    assert manifest.version == "v1alpha"
    assert manifest.type == "nilus"
    assert manifest.tags == ("nilus-stream",)
    assert manifest.description == "Stream NATS+JetStream orders into the lakehouse."
    assert manifest.spec.type == "stream"
    assert manifest.spec.compute == "universe-compute"
    assert pipeline.app_id == "nilus-dagster/nats-orders-stream"
    _assert_page_source(
        pipeline,
        servers=("nats.prod:4222",),
        durable="nilus-orders",
        batch_size=1000,
        timeout=30,
        auth_mode="nkeys",
        credentials=(None, None, None, "{NATS_NKEYS_SEED}"),
        placeholders=["NATS_NKEYS_SEED"],
    )


def test_example_sink_defaults() -> None:
    # The example sink with a source that leaves every default in place.
    minimal = "source:\n  address: nats+jetstream://?subject=s\n  options:\n    source_table: x\n"
    pipeline = _parse(_around(minimal))
    address = pipeline.manifest.source.address

    assert address.servers == ("localhost:4222",)
    assert address.batch_size == 100
    assert address.timeout == 10
    assert pipeline.manifest.source.options.run_in_loop is False
    _assert_page_sink(pipeline)


def test_documented_defaults_apply_when_omitted() -> None:
    text = """\
name: defaults
spec:
  type: stream
  source:
    address: nats+jetstream://nats.prod?subject=orders.created
    options:
      source_table: orders-stream
  sink:
    address: dataos://lake
    options:
      dest_table: analytics.orders
"""
    manifest = _parse(text).manifest

    assert manifest.version == "v1alpha"
    assert manifest.type == "nilus"
    assert manifest.source.address.servers == ("nats.prod:4222",)
    assert manifest.source.options.run_in_loop is False
    assert manifest.sink.options.incremental_strategy == "append"
    assert manifest.sink.options.create_table is True


PAGE_VALUES_BY_FILE = {
    "nats-orders-stream.yaml": PAGE_SAMPLE,
    "orders-local.yaml": _around(PAGE_LOCAL),
    "orders-userpass.yaml": _around(PAGE_USERPASS),
    "orders-token.yaml": _around(PAGE_TOKEN),
    "orders-nkeys.yaml": _around(PAGE_NKEYS),
}


def test_pipelines_folder_holds_the_page_examples() -> None:
    pipelines, problems = collect_pipelines([PIPELINES])

    assert problems == []
    by_file = {p.path.name: p for p in pipelines}
    # depots.example.yaml is a depots file: skipped, not a pipeline.
    assert "depots.example.yaml" not in by_file
    assert set(PAGE_VALUES_BY_FILE) <= set(by_file)
    for file, page_text in PAGE_VALUES_BY_FILE.items():
        page = _parse(page_text).manifest
        shipped = by_file[file].manifest
        assert shipped.source == page.source, file
        assert shipped.sink.address == page.sink.address, file
        assert shipped.spec.type == "stream"


def test_sample_file_is_the_page_sample_exactly() -> None:
    shipped = parse_pipeline(PIPELINES / "nats-orders-stream.yaml").manifest

    assert shipped == _parse(PAGE_SAMPLE).manifest


def test_shipped_sinks() -> None:
    by_name = {p.name: p.manifest.sink.options for p in collect_pipelines([PIPELINES])[0]}

    assert by_name["orders-local"].dest_table == "analytics.orders_local"
    assert by_name["orders-nkeys"].incremental_strategy == "merge"
    assert by_name["orders-nkeys"].primary_key == ("order_id",)
    assert by_name["orders-userpass"].dest_table == "analytics.orders_userpass"
    assert all(o.create_table for o in by_name.values())


V2 = """\
name: spelled
spec:
  type: stream
  source:
    address: nats+jetstream://nats.prod:4222?subject=orders.created
    options:
      source_table: orders-stream
      run_in_loop: true
  sink:
    address: dataos://lake?purpose=rw
    options:
      dest_table: analytics.orders
      incremental_strategy: merge
      primary_key: [order_id, region]
      create_table: false
"""


def test_v1_hyphenated_spellings_parse_the_same() -> None:
    v1 = (
        V2.replace("source_table", "source-table")
        .replace("run_in_loop", "run-in-loop")
        .replace("dest_table", "dest-table")
        .replace("incremental_strategy", "incremental-strategy")
        .replace("primary_key", "primary-key")
        .replace("create_table", "create-table")
    )
    assert v1.count("-") > V2.count("-") + 5

    underscored = _parse(V2).manifest
    hyphenated = _parse(v1).manifest

    assert hyphenated == underscored
    assert hyphenated.sink.options.primary_key == ("order_id", "region")
    assert hyphenated.sink.options.create_table is False
    assert hyphenated.source.options.run_in_loop is True


def test_primary_key_forms() -> None:
    one = _parse(V2.replace("[order_id, region]", "order_id")).manifest
    comma = _parse(V2.replace("[order_id, region]", '"order_id, region"')).manifest

    assert one.sink.options.primary_key == ("order_id",)
    assert comma.sink.options.primary_key == ("order_id", "region")


def test_projection_and_dagster_blocks_parse() -> None:
    manifest = parse_pipeline(PIPELINES / "orders-userpass.yaml").manifest
    projection = manifest.spec.use.projection

    assert [(s.id, s.contextAlias) for s in projection.secrets] == [
        ("engineering:natssecret", "natssecret")
    ]
    assert [p.key for p in projection.projections.envVars] == ["NATS_USERNAME", "NATS_PASSWORD"]
    assert manifest.spec.dagster.partitions == "daily"
