"""Property: payloads of every shape, published to a real server and run through the engine,
each become a row or a dead letter, never lost, never twice.

One server (with an 8 MB max_payload, so that multi-megabyte messages can be published) and one
stream for the whole property; every example publishes a few messages on a subject of its own
and runs the engine into a table of its own, and the checker looks at what it published.
Payloads that are not JSON objects must be dead letters holding their exact bytes.
"""

import itertools
import json
import os

import pytest
from checker import check_exactly_once
from conftest import Publisher
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nilus_dagster.engine import run_pipeline
from nilus_dagster.manifest import parse_pipeline

STREAM = "BADINPUT"
SUBJECT = "bad.input"  # each example publishes on a subject below it

# Few field names, so that types collide across messages and batches; some are awkward
# (case twins, a metadata column's name, an empty name, dots and spaces).
FIELDS = st.sampled_from(
    ["a", "A", "b", "n", "x.y", "with space", "", "_nats_seq", "_nats_data", "ключ", "id"]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=2**63, max_value=2**80),  # past int64
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(FIELDS, inner, max_size=4)
    ),
    max_leaves=12,
)
OBJECTS = st.dictionaries(FIELDS, VALUES, max_size=6)


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# Built once: generating megabytes per example would dominate the property's time.
HUGE = [
    json.dumps({"id": 1, "blob": "x" * 3_000_000}).encode(),  # a 3 MB object
    json.dumps(list(range(300_000))).encode(),  # a 2 MB array: not an object
    os.urandom(1_500_000),  # 1.5 MB of binary
]

PAYLOADS = st.one_of(
    OBJECTS.map(lambda o: json.dumps(o, ensure_ascii=False).encode()),
    OBJECTS.map(lambda o: json.dumps(o).encode()),  # \u escapes
    st.just(b""),
    st.binary(max_size=64),
    VALUES.map(lambda v: json.dumps(v).encode()),  # any JSON: arrays, scalars, null
    st.integers(min_value=1, max_value=25_000).map(_nested),
    st.sampled_from(
        [
            b'{"a": "\xff\xfe"}',  # invalid UTF-8 inside a string
            b'{"a": "\\ud800"}',  # a lone surrogate escape
            b'{"a": NaN}',
            b'{"a": 1, "a": "dup"}',  # duplicate key, types differ
            b'{"a": 1}{"a": 2}',  # two objects in one message
            b'{"a": 1}\n{"a": 2}',
            b'{"a":\n1}',
            b"\xef\xbb\xbf{}",  # BOM
            b"   {}   ",
            b"{}",
            b"null",
        ]
    ),
    st.sampled_from(HUGE),
)


def _is_object(payload: bytes) -> bool:
    try:
        return isinstance(json.loads(payload), dict)
    except (ValueError, RecursionError):
        return False


@pytest.fixture(scope="module")
def big_server(tmp_path_factory):  # type: ignore[no-untyped-def]
    from nilus_dagster.jetstream.local_server import LocalNatsServer

    server = LocalNatsServer(
        store_dir=tmp_path_factory.mktemp("nats-big"), config="max_payload: 8MB\n"
    )
    server.start()
    Publisher(server.url).create_stream(STREAM, [f"{SUBJECT}.>"], max_msg_size=8 * 1024 * 1024)
    yield server
    server.stop(remove_store=True)


_examples = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payloads=st.lists(PAYLOADS, min_size=1, max_size=12))
def test_every_payload_is_a_row_or_a_dead_letter(big_server, write_manifest, payloads):
    # One stream for the whole property, a subject and a table per example: examples are
    # independent, so hypothesis can shrink a failure to the payloads that cause it.
    n = next(_examples)
    subject = f"{SUBJECT}.e{n}"
    pipeline = parse_pipeline(
        write_manifest(
            name=f"fuzz{n}",
            address=f"nats+jetstream://{big_server.hostport}?subject={subject}&batch_size=7",
            stream=STREAM,
            dest_table=f"fuzz.t{n}",
            extra_sink_options="commit_max_rows: 5\n",
        )
    )
    seqs = Publisher(big_server.url).publish(subject, list(payloads))

    report = run_pipeline(pipeline, drain=True)

    assert report.position == seqs[-1]
    result = check_exactly_once(report.table_uri, seqs, pipeline.app_id)
    assert result.ok, str(result)
    not_objects = {s: p for s, p in zip(seqs, payloads, strict=True) if not _is_object(p)}
    if not_objects:
        dead = DeltaTable(report.table_uri + "__dead_letters").to_pyarrow_table(
            columns=["_nats_seq", "_nats_data", "error"]
        )
        held = {
            row["_nats_seq"]: row for row in dead.to_pylist() if row["_nats_seq"] in not_objects
        }
        assert set(held) == set(not_objects), "a payload that is not a JSON object became a row"
        for seq, payload in not_objects.items():
            assert bytes(held[seq]["_nats_data"]) == payload
            assert held[seq]["error"]


@pytest.mark.parametrize("depth", [33, 400, 960, 1_999, 2_500, 25_000])
def test_a_deeply_nested_object_is_a_dead_letter_not_a_failed_run(
    publisher, stream_pipeline, depth
):
    # 400..1999 levels once crashed the run with RecursionError (under the bracket count
    # that guards Arrow, over Python's recursion limit in the depth and shape helpers).
    subject, pipeline = stream_pipeline("deep")
    # With a list that starts with a null, Arrow's read of the batch is invalid as well.
    seqs = publisher.publish(subject, [{"a": 0}, _nested(depth), {"a": 1, "b": [None, 1]}])

    report = run_pipeline(pipeline)

    assert (report.rows_written, report.dead_letters) == (2, 1)
    result = check_exactly_once(report.table_uri, seqs, pipeline.app_id, expect_dead=[seqs[1]])
    assert result.ok, str(result)


def test_empty_objects_and_null_members_never_break_the_table(publisher, stream_pipeline):
    # Both once stopped the pipeline for good on valid payloads: struct<> failed every
    # commit ("Parquet does not support writing empty structs"), and a member first seen as
    # null (a void column) that later held an object committed, then left a log that no
    # reader could open ("whilst decoding field 'nullCount' ... expected { got 1").
    subject, pipeline = stream_pipeline("empty")
    first = publisher.publish(
        subject,
        [
            {"a": {}, "l": [{}], "s": {"b": None, "c": 1}, "n": 1},
            {"a": None, "l": [[{}]], "s": {"e": {}}},
        ],
    )
    run_pipeline(pipeline)
    later = publisher.publish(
        subject,
        [
            {"a": {"k": "v"}, "l": [{"x": 2}], "s": {"b": {"d": True}, "c": 2}},
            {"s": {"b": None}},
            {"n": {}},  # an object where the table has numbers: a dead letter
        ],
    )

    report = run_pipeline(pipeline)

    result = check_exactly_once(
        report.table_uri, first + later, pipeline.app_id, expect_dead=[later[2]]
    )
    assert result.ok, str(result)
    rows = {r["_nats_seq"]: r for r in DeltaTable(report.table_uri).to_pyarrow_table().to_pylist()}
    assert rows[first[0]]["a"] is None and rows[first[0]]["s"]["c"] == 1
    assert rows[first[0]]["s"]["b"] is None
    assert rows[later[0]]["a"] == {"k": "v"}
    assert rows[later[0]]["s"] == {"b": {"d": True}, "c": 2}
    assert rows[later[1]]["s"] == {"b": None, "c": None}


def test_lists_that_start_with_nulls_keep_every_element(publisher, stream_pipeline):
    # pyarrow 26's JSON reader collapses the leading nulls of a list whose element type it
    # learns after them; the invalid table once failed the run, and every re-run.
    subject, pipeline = stream_pipeline("lists")
    payloads: list[bytes | dict[str, object]] = [
        {"a": [None, None]},
        {"a": [None, 1]},
        {"a": [2, None, 3]},
        {"s": {"x": [None, None, "q"]}},
        {"l": [None, [None, 1.5]]},
        {"o": [None, {"b": True}]},
    ]
    seqs = publisher.publish(subject, payloads)

    report = run_pipeline(pipeline)

    assert check_exactly_once(report.table_uri, seqs, pipeline.app_id).ok
    rows = {r["_nats_seq"]: r for r in DeltaTable(report.table_uri).to_pyarrow_table().to_pylist()}
    assert [rows[s]["a"] for s in seqs[:3]] == [[None, None], [None, 1], [2, None, 3]]
    assert rows[seqs[3]]["s"] == {"x": [None, None, "q"]}
    assert rows[seqs[4]]["l"] == [None, [None, 1.5]]
    assert rows[seqs[5]]["o"] == [None, {"b": True}]


def test_a_payload_field_named_like_the_raw_data_column_is_checked_like_any_other(
    publisher, stream_pipeline
):
    # conform let a JSON field "_nats_data" through unchecked (the raw format's column name):
    # once its type changed, every commit failed ("Unsupported CAST from Boolean to List").
    subject, pipeline = stream_pipeline("data")
    first = publisher.publish(subject, [{"_nats_data": [1]}])
    run_pipeline(pipeline)
    later = publisher.publish(subject, [{"_nats_data": False}])
    run_pipeline(pipeline)
    later += publisher.publish(subject, [{"_nats_data": [2, 3]}])

    report = run_pipeline(pipeline)

    result = check_exactly_once(report.table_uri, first + later, pipeline.app_id)
    assert result.ok and result.in_dead_letters == 1, str(result)
    rows = {r["_nats_seq"]: r for r in DeltaTable(report.table_uri).to_pyarrow_table().to_pylist()}
    assert rows[first[0]]["_nats_data"] == [1] and rows[later[1]]["_nats_data"] == [2, 3]
