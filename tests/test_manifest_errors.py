"""Bad manifests: each gives one ``FILE: FIELD: message`` problem that says what to fix."""

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from nilus_dagster.errors import ManifestError, Problem
from nilus_dagster.manifest import (
    collect_pipelines,
    default_pipeline_targets,
    load_pipelines,
    parse_pipeline,
)

ADDRESS = "nats+jetstream://localhost:4222?subject=orders.created"
BASE: dict[str, Any] = {
    "name": "orders",
    "version": "v1alpha",
    "type": "nilus",
    "spec": {
        "type": "stream",
        "source": {"address": ADDRESS, "options": {"source_table": "orders-stream"}},
        "sink": {
            "address": "dataos://lake?purpose=rw",
            "options": {"dest_table": "analytics.orders", "incremental_strategy": "append"},
        },
    },
}
DELETE = object()


def edit(path: str, value: object) -> str:
    """BASE with the dotted ``path`` set to ``value`` (or removed), as YAML text."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def address(suffix: str = "", authority: str = "localhost:4222") -> str:
    return edit(
        "spec.source.address", f"nats+jetstream://{authority}?subject=orders.created" + suffix
    )


def sink_option(key: str, value: object) -> str:
    return edit(f"spec.sink.options.{key}", value)


# (id, manifest text, field named, words the message must hold)
CASES: list[tuple[str, str, str, str]] = [
    (
        "malformed-yaml",
        "name: orders\nspec:\n  type: [stream\n  source: x\n",
        "line 4, column 9",
        "is not valid YAML: expected ',' or ']', but got ':'; fix the indentation",
    ),
    (
        "bad-indentation",
        "name: orders\n  spec: x\n",
        "line 2, column 7",
        "is not valid YAML: mapping values are not allowed here",
    ),
    (
        "impossible-date",
        "name: 2001-02-30\n",
        "(file)",
        "is not valid YAML: a value cannot be read as its type (ValueError); quote dates",
    ),
    ("empty-file", "", "(file)", "is empty: write a Nilus manifest (name:, spec:)"),
    ("only-comments", "# nothing yet\n", "(file)", "is empty: write a Nilus manifest"),
    (
        "top-level-list",
        "- name: a\n- name: b\n",
        "(top level)",
        "must be a mapping (name:, spec: ...), got a list; a file holds one pipeline",
    ),
    ("top-level-text", "orders\n", "(top level)", "must be a mapping (name:, spec: ...), got text"),
    (
        "missing-name",
        edit("name", DELETE),
        "name",
        "is required: add name: <pipeline-name> at the top of the file",
    ),
    (
        "missing-spec",
        edit("spec", DELETE),
        "spec",
        "is required: add a spec: block with type, source and sink",
    ),
    ("empty-spec", edit("spec", None), "spec", "is empty: add a spec: block"),
    (
        "missing-source",
        edit("spec.source", DELETE),
        "spec.source",
        "is required: add a source: block with address and options under spec",
    ),
    (
        "missing-sink",
        edit("spec.sink", DELETE),
        "spec.sink",
        "is required: add a sink: block with address and options under spec",
    ),
    ("missing-type", edit("spec.type", DELETE), "spec.type", "is required: add type: stream"),
    (
        "missing-address",
        edit("spec.source.address", DELETE),
        "spec.source.address",
        "is required: add address: nats+jetstream://HOST:PORT?subject=SUBJECT",
    ),
    (
        "address-not-text",
        edit("spec.source.address", 5),
        "spec.source.address",
        "must be text: nats+jetstream://HOST:PORT?subject=SUBJECT",
    ),
    (
        "missing-subject",
        edit("spec.source.address", "nats+jetstream://localhost:4222"),
        "spec.source.address.subject",
        "is required: add ?subject=<subject> to the address (e.g. ?subject=orders.created)",
    ),
    (
        "bad-subject",
        address().replace("orders.created", "orders..created"),
        "spec.source.address.subject",
        "'orders..created' is not a valid NATS subject",
    ),
    (
        "missing-source-options",
        edit("spec.source.options", None),
        "spec.source.options",
        "is empty: add options: {source_table: <stream name>}",
    ),
    (
        "missing-source-table",
        edit("spec.source.options.source_table", DELETE),
        "spec.source.options.source_table",
        "is required: add source_table: <JetStream stream name>",
    ),
    (
        "missing-dest-table",
        edit("spec.sink.options.dest_table", DELETE),
        "spec.sink.options.dest_table",
        "is required: add dest_table: <schema>.<table>",
    ),
    (
        "unknown-source-option",
        edit("spec.source.options.run_in_lop", True),
        "spec.source.options.run_in_lop",
        "is not a known option; did you mean run_in_loop? known options: run_in_loop, source_table",
    ),
    (
        "unknown-sink-option",
        sink_option("cluster_by", "day"),
        "spec.sink.options.cluster_by",
        "is not a known option; known options: checkpoint_every, commit_max_bytes",
    ),
    (
        "unknown-top-level-key",
        edit("stack", "nilus:1.0"),
        "stack",
        "is not a known option; known options: description, name, spec, tags, type, version",
    ),
    (
        "unknown-address-option",
        address("&batchsize=5"),
        "spec.source.address.batchsize",
        "is not a known address option; did you mean batch_size? known options: subject, durable",
    ),
    (
        "option-given-twice",
        address("&timeout=1&timeout=2"),
        "spec.source.address.timeout",
        "is given twice in the address; keep one",
    ),
    (
        "wrong-scheme",
        edit("spec.source.address", "nats://localhost:4222?subject=s"),
        "spec.source.address.scheme",
        "'nats' is not supported: the NATS source address starts with nats+jetstream://",
    ),
    (
        "kafka-scheme",
        edit("spec.source.address", "kafka://b:9092?subject=s"),
        "spec.source.address.scheme",
        "'kafka' is not supported",
    ),
    (
        "port-out-of-range",
        address(authority="localhost:70000"),
        "spec.source.address.port",
        "must be a number from 1 to 65535, got '70000'",
    ),
    (
        "port-not-a-number",
        address(authority="localhost:nats"),
        "spec.source.address.port",
        "must be a number from 1 to 65535, got 'nats'",
    ),
    (
        "batch-size-zero",
        address("&batch_size=0"),
        "spec.source.address.batch_size",
        "must be a positive whole number, got '0'",
    ),
    (
        "batch-size-negative",
        address("&batch_size=-10"),
        "spec.source.address.batch_size",
        "must be a positive whole number, got '-10'",
    ),
    (
        "batch-size-not-a-number",
        address("&batch_size=many"),
        "spec.source.address.batch_size",
        "must be a positive whole number, got 'many'",
    ),
    (
        "timeout-zero",
        address("&timeout=0"),
        "spec.source.address.timeout",
        "must be a positive number of seconds, got '0'",
    ),
    (
        "timeout-not-a-number",
        address("&timeout=soon"),
        "spec.source.address.timeout",
        "must be a positive number of seconds, got 'soon'",
    ),
    (
        "bad-ack-policy",
        address("&durable=d&ack_policy=sometimes"),
        "spec.source.address.ack_policy",
        "must be none, all or explicit, got 'sometimes'",
    ),
    (
        "ack-policy-without-durable",
        address("&ack_policy=explicit"),
        "spec.source.address.ack_policy",
        "ack_policy=explicit needs a durable consumer: add &durable=<name>",
    ),
    (
        "bad-format",
        address("&format=avro"),
        "spec.source.address.format",
        "must be json or raw, got 'avro'",
    ),
    (
        "bad-start-time",
        address("&start_time=yesterday"),
        "spec.source.address.start_time",
        "must be an ISO-8601 time such as 2025-01-31T00:00:00Z, got 'yesterday'",
    ),
    (
        "start-time-and-sequence",
        address("&start_time=2025-01-01&start_sequence=5"),
        "spec.source.address.start_time",
        "and start_sequence are both given; keep one of them",
    ),
    (
        "token-twice",
        address("&token={B}", authority="{A}@localhost:4222"),
        "spec.source.address.token",
        "is given both before '@' and as ?token=; keep one",
    ),
    (
        "several-auth-modes",
        address("&nkeys_seed={S}", authority="{U}:{P}@localhost"),
        "spec.source.address.auth",
        "gives several auth modes (user/password, nkeys_seed); NATS takes one: keep one of them",
    ),
    (
        "tls-cert-without-key",
        address("&tls_cert=client.pem"),
        "spec.source.address.tls_key",
        "is missing: tls_cert and tls_key go together; add &tls_key=<path>",
    ),
    (
        "bad-durable",
        address("&durable=nilus.orders"),
        "spec.source.address.durable",
        "'nilus.orders' is not a valid consumer name",
    ),
    (
        "merge-without-primary-key",
        sink_option("incremental_strategy", "merge"),
        "spec.sink.options.primary_key",
        "is required with incremental_strategy: merge (the column(s) a row is upserted on): "
        "add primary_key: <column>",
    ),
    (
        "bad-primary-key",
        sink_option("primary_key", 5),
        "spec.sink.options.primary_key",
        "must be a column name or a list of column names, got 5",
    ),
    (
        "bad-incremental-strategy",
        sink_option("incremental_strategy", "upsert"),
        "spec.sink.options.incremental_strategy",
        "must be 'append', 'replace' or 'merge', got 'upsert'",
    ),
    (
        "dest-table-without-dot",
        sink_option("dest_table", "orders"),
        "spec.sink.options.dest_table",
        "must be <schema>.<table> (letters, digits, '_' or '-', one dot), or for object stores the "
        "table's location (s3://bucket/path/table or an absolute path), got 'orders': write e.g. "
        "dest_table: analytics.orders",
    ),
    (
        "dest-table-location-of-another-scheme",
        sink_option("dest_table", "https://lake.example/x/orders"),
        "spec.sink.options.dest_table",
        "'https://lake.example/x/orders' is not an object-store location: a fully qualified "
        "dest_table starts with one of file://, s3://",
    ),
    (
        "dest-table-location-without-a-folder",
        sink_option("dest_table", "s3://lake"),
        "spec.sink.options.dest_table",
        "'s3://lake' is not a table location: give the table's folder, e.g. "
        "s3://analytics-lake/nilus/orders",
    ),
    (
        "partition-by-not-names",
        sink_option("partition_by", 5),
        "spec.sink.options.partition_by",
        "must be a column name or a list of column names, got 5",
    ),
    (
        "partition-by-column-twice",
        sink_option("partition_by", ["day", "day"]),
        "spec.sink.options.partition_by",
        "names a column twice: ['day', 'day']",
    ),
    (
        "create-table-not-bool",
        sink_option("create_table", "maybe"),
        "spec.sink.options.create_table",
        "must be true or false, got 'maybe'",
    ),
    (
        "run-in-loop-not-bool",
        edit("spec.source.options.run_in_loop", "always"),
        "spec.source.options.run_in_loop",
        "must be true or false, got 'always'",
    ),
    (
        "batch-type",
        edit("spec.type", "batch"),
        "spec.type",
        "'batch' is not supported: nilus_dagster runs stream pipelines; set spec.type: stream",
    ),
    (
        "v1-workflow",
        edit("type", "workflow"),
        "type",
        "must be 'nilus', got 'workflow'; v1 workflow/service manifests (stack: nilus) are not "
        "read",
    ),
    (
        "bad-name",
        edit("name", "Orders Stream"),
        "name",
        "'Orders Stream' must be lower-case letters, digits, '-' or '_' (at most 64)",
    ),
    ("name-not-text", edit("name", ["a"]), "name", "must be text, got a list ['a']"),
    (
        "sink-read-only",
        edit("spec.sink.address", "dataos://lake?purpose=r"),
        "spec.sink.address.purpose",
        "is r (read-only); a sink needs purpose=rw",
    ),
    (
        "sink-unknown-scheme",
        edit("spec.sink.address", "kafka://topic"),
        "spec.sink.address.scheme",
        "'kafka' is not a supported sink; use dataos://<depot>",
    ),
    (
        "option-spelled-both-ways",
        edit("spec.source.options.source-table", "other"),
        "spec.source.options",
        "'source_table' and 'source-table' are the same option spelled twice; keep one",
    ),
    ("tags-not-a-list", edit("tags", "nilus-stream"), "tags", "must be a list, got text"),
    (
        "commit-max-rows-zero",
        sink_option("commit_max_rows", 0),
        "spec.sink.options.commit_max_rows",
        "must be a positive whole number, got 0",
    ),
]


@pytest.mark.parametrize(
    ("text", "field", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_manifest_names_file_and_field(
    tmp_path: Path, text: str, field: str, words: str
) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(text)

    with pytest.raises(ManifestError) as caught:
        parse_pipeline(file)

    problems = caught.value.problems
    assert [p.field for p in problems] == [field], problems
    (problem,) = problems
    assert problem.file == str(file)
    assert words in problem.message
    assert str(problem) == f"{file}: {field}: {problem.message}"
    assert str(caught.value) == str(problem)


def test_there_are_at_least_25_distinct_cases() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 25
    assert len({c[1] for c in CASES}) == len(CASES)


def test_every_problem_in_a_file_is_reported(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    del data["name"]
    data["spec"]["source"]["address"] = ADDRESS + "&batch_size=0"
    data["spec"]["sink"]["options"]["dest_table"] = "nodot"
    file = tmp_path / "many.yaml"
    file.write_text(yaml.safe_dump(data))

    with pytest.raises(ManifestError) as caught:
        parse_pipeline(file)

    assert sorted(p.field for p in caught.value.problems) == [
        "name",
        "spec.sink.options.dest_table",
        "spec.source.address.batch_size",
    ]
    assert len(str(caught.value).splitlines()) == 3


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_pipeline(tmp_path / "nope.yaml")

    assert caught.value.problems == [
        Problem(str(tmp_path / "nope.yaml"), "(file)", "does not exist")
    ]


def test_not_utf8(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yaml"
    file.write_bytes("name: caf\xe9\n".encode("latin-1"))

    pipelines, problems = collect_pipelines([file])

    assert pipelines == []
    assert [(p.field, p.message.split(":")[0]) for p in problems] == [("(file)", "cannot be read")]


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_duplicate_names_across_a_folder(tmp_path: Path) -> None:
    first = _write(tmp_path / "p", "a.yaml", edit("name", "orders"))
    second = _write(tmp_path / "p" / "sub", "b.yml", edit("name", "orders"))

    pipelines, problems = collect_pipelines([tmp_path / "p"])

    assert [p.path for p in pipelines] == [first]
    assert problems == [
        Problem(
            str(second),
            "name",
            f"'orders' is already used by {first}; pipeline names must be unique",
        )
    ]
    with pytest.raises(ManifestError, match="pipeline names must be unique"):
        load_pipelines([tmp_path / "p"])


def test_good_and_bad_files_together(tmp_path: Path) -> None:
    good = _write(tmp_path, "good.yaml", edit("name", "good"))
    bad = _write(tmp_path, "bad.yaml", address("&batch_size=0"))

    pipelines, problems = collect_pipelines([tmp_path])

    assert [p.path for p in pipelines] == [good]
    assert [(p.file, p.field) for p in problems] == [(str(bad), "spec.source.address.batch_size")]


def test_depots_only_file_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path, "depots.yaml", "depots:\n  lake:\n    root: ./lake\n")
    _write(tmp_path, "orders.yaml", edit("name", "orders"))

    pipelines, problems = collect_pipelines([tmp_path])

    assert (problems, [p.name for p in pipelines]) == ([], ["orders"])


def test_malformed_depots_only_file_is_reported(tmp_path: Path) -> None:
    depots = _write(tmp_path, "depots.yaml", "depots:\n  lake:\n    storage_options: {}\n")

    pipelines, problems = collect_pipelines([tmp_path])

    assert pipelines == []
    assert problems == [
        Problem(
            str(depots),
            "depots.lake.root",
            "is required: the storage root (s3://bucket/prefix, or a folder)",
        )
    ]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing.yaml", "does not exist"),
        ("nothing-*.yaml", "matches no *.yaml or *.yml file"),
        ("empty-folder", "holds no *.yaml or *.yml file"),
    ],
)
def test_targets_that_find_nothing(tmp_path: Path, target: str, message: str) -> None:
    (tmp_path / "empty-folder").mkdir()

    pipelines, problems = collect_pipelines([tmp_path / target])

    assert pipelines == []
    assert [p.message for p in problems] == [message]
    assert problems[0].file == str(tmp_path / target)


def test_folders_files_and_globs(tmp_path: Path) -> None:
    a = _write(tmp_path / "one", "a.yaml", edit("name", "a"))
    b = _write(tmp_path / "one" / "deep", "b.yml", edit("name", "b"))
    c = _write(tmp_path / "two", "c.yaml", edit("name", "c"))
    d = _write(tmp_path / "three", "d.yml", edit("name", "d"))
    _write(tmp_path / "three", "notes.txt", "not yaml")

    targets: list[Callable[[], list[object]]] = [
        lambda: [tmp_path / "one"],
        lambda: [c, str(tmp_path / "three" / "*")],
        lambda: [str(tmp_path / "**" / "*.yml")],
        # The same file reached twice is read once (no duplicate-name problem).
        lambda: [tmp_path / "one", a],
    ]
    found = []
    for target in targets:
        pipelines, problems = collect_pipelines(target())  # type: ignore[arg-type]
        assert problems == []
        found.append(sorted(p.name for p in pipelines))

    assert found == [["a", "b"], ["c", "d"], ["b", "d"], ["a", "b"]]
    assert {a, b, c, d} == {p.path for p in collect_pipelines([tmp_path])[0]}


def test_default_targets() -> None:
    assert default_pipeline_targets({}) == ["pipelines"]
    assert default_pipeline_targets({"NILUS_PIPELINES": f"a{os.pathsep}b/*.yaml"}) == [
        "a",
        "b/*.yaml",
    ]
