"""Decoding MessageBatch payloads into Arrow rows and dead letters."""

import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.decode import MAX_NESTING, BatchDecoder, decode, validate_payload
from nilus_dagster.sink.schema import DEAD_LETTER_SCHEMA, HEADERS_TYPE, RAW_SCHEMA, TIMESTAMP_TYPE

BASE_NS = 1_735_689_600_000_000_000  # 2025-01-01T00:00:00Z


def batch(payloads: list[object], start: int = 1, headers=None, subjects=None) -> MessageBatch:
    data = [p if isinstance(p, bytes) else json.dumps(p).encode() for p in payloads]
    n = len(data)
    return MessageBatch(
        sequences=list(range(start, start + n)),
        timestamps_ns=[BASE_NS + i * 1_000_000_007 for i in range(n)],
        subjects=subjects or ["orders.created"] * n,
        payloads=data,
        headers=headers,
    )


def test_nested_objects_and_arrays_become_nested_arrow_types() -> None:
    decoded = decode(
        batch(
            [
                {
                    "id": 1,
                    "customer": {"name": "a", "tags": ["x"]},
                    "items": [{"sku": "s", "q": 2}],
                },
                {"id": 2, "customer": {"name": "b", "tags": []}, "items": []},
            ]
        )
    )
    rows = decoded.rows
    assert decoded.dead_letters.num_rows == 0
    assert rows.schema.field("id").type == pa.int64()
    assert pa.types.is_struct(rows.schema.field("customer").type)
    assert rows.schema.field("customer").type.field("tags").type == pa.list_(pa.string())
    items = rows.schema.field("items").type
    assert pa.types.is_list(items) and pa.types.is_struct(items.value_type)
    assert rows.column("customer").to_pylist()[0] == {"name": "a", "tags": ["x"]}
    assert rows.column("items").to_pylist() == [[{"sku": "s", "q": 2}], []]


def test_metadata_columns_and_their_types() -> None:
    b = batch([{"a": 1}, {"a": 2}], start=41, subjects=["orders.eu", "orders.us"])
    rows = decode(b).rows
    assert rows.column_names[-4:] == [
        "_nats_subject",
        "_nats_seq",
        "_nats_timestamp",
        "_nats_headers",
    ]
    assert rows.schema.field("_nats_subject").type == pa.string()
    assert rows.schema.field("_nats_seq").type == pa.uint64()
    assert rows.schema.field("_nats_timestamp").type == TIMESTAMP_TYPE
    assert rows.schema.field("_nats_headers").type == HEADERS_TYPE
    assert rows.column("_nats_subject").to_pylist() == ["orders.eu", "orders.us"]
    assert rows.column("_nats_seq").to_pylist() == [41, 42]
    assert rows.column("_nats_timestamp").to_pylist() == [
        datetime(2025, 1, 1, tzinfo=timezone.utc),
        datetime(2025, 1, 1, 0, 0, 1, 0, tzinfo=timezone.utc),  # ns truncated to us
    ]


def test_headers_are_a_map_or_null() -> None:
    without = decode(batch([{"a": 1}])).rows
    assert without.column("_nats_headers").to_pylist() == [None]
    with_some = decode(
        batch([{"a": 1}, {"a": 2}, {"a": 3}], headers=[{"trace": "t1", "k": "v"}, None, {}])
    ).rows
    assert with_some.column("_nats_headers").to_pylist() == [
        [("trace", "t1"), ("k", "v")],
        None,
        None,
    ]


def test_raw_format_keeps_payload_bytes_without_parsing() -> None:
    payloads = [b"\x00\xffbinary", b"", b'{"a":1}', b"not json"]
    decoded = decode(batch(payloads, start=7), format="raw")
    assert decoded.rows.schema == RAW_SCHEMA
    assert decoded.rows.column("_nats_data").to_pylist() == payloads
    assert decoded.rows.column("_nats_seq").to_pylist() == [7, 8, 9, 10]
    assert decoded.dead_letters.num_rows == 0


@pytest.mark.parametrize(
    ("poison", "error"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2, 3]", "an array, not a JSON object"),
        (b"42", "a number, not a JSON object"),
        (b'"text"', "a string, not a JSON object"),
        (b"null", "null, not a JSON object"),
        (b"", "empty payload"),
        (b"   ", "empty payload"),
        (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
        (b'{"\xff": 1}', "not valid UTF-8"),
        (b'{"a": 1', "not JSON"),
        (b'{"a": 1} {"a": 2}', "not JSON"),
        (b'{"a": 1, "a": 2}', "specified twice"),
        (b'{"a": "line\nbreak"}', "not JSON"),
        (b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested too deeply"),
        (b'{"a":' + b'{"b":' * 40 + b"1" + b"}" * 40 + b"}", "nested 40 levels deep"),
    ],
    ids=[
        "text",
        "array",
        "number",
        "string",
        "null",
        "empty",
        "blank",
        "bad-utf8-value",
        "bad-utf8-key",
        "truncated",
        "two-objects",
        "duplicate-key",
        "raw-newline-in-string",
        "30k-deep",
        "40-deep",
    ],
)
def test_poison_in_the_middle_keeps_good_rows(poison: bytes, error: str) -> None:
    good = [{"id": i, "v": f"x{i}"} for i in range(6)]
    payloads: list[object] = [*good[:3], poison, *good[3:]]
    decoded = decode(batch(payloads, start=100))
    assert decoded.rows.column("id").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert decoded.rows.column("_nats_seq").to_pylist() == [100, 101, 102, 104, 105, 106]
    dead = decoded.dead_letters
    assert dead.schema == DEAD_LETTER_SCHEMA
    assert dead.num_rows == 1
    letter = dead.to_pylist()[0]
    assert letter["_nats_seq"] == 103
    assert letter["_nats_subject"] == "orders.created"
    assert letter["_nats_data"] == poison
    assert error in letter["error"]
    assert len(letter["error"]) <= 1000
    assert letter["failed_at"] is not None


def test_pretty_printed_json_is_a_row() -> None:
    pretty = json.dumps({"id": 9, "nested": {"a": [1, 2]}}, indent=2).encode()
    crlf = b'{\r\n  "id": 10\r\n}'
    decoded = decode(batch([{"id": 8}, pretty, crlf, {"id": 11}]))
    assert decoded.dead_letters.num_rows == 0
    assert decoded.rows.column("id").to_pylist() == [8, 9, 10, 11]
    assert decoded.rows.column("nested").to_pylist()[1] == {"a": [1, 2]}


def test_leading_whitespace_and_unicode_are_rows() -> None:
    decoded = decode(batch([b'  {"id": 1}', '{"name": "Zoë ☃"}'.encode(), {"id": 3}]))
    assert decoded.dead_letters.num_rows == 0
    assert decoded.rows.column("name").to_pylist() == [None, "Zoë ☃", None]


def test_huge_payload_is_a_row() -> None:
    big = {"id": 2, "blob": "x" * 6_000_000, "many": list(range(5000))}
    decoded = decode(batch([{"id": 1}, big, {"id": 3}]))
    assert decoded.dead_letters.num_rows == 0
    assert decoded.rows.column("id").to_pylist() == [1, 2, 3]
    assert len(decoded.rows.column("blob")[1].as_py()) == 6_000_000


def test_nesting_up_to_the_limit_is_kept() -> None:
    value: object = 1
    for _ in range(MAX_NESTING):
        value = {"b": value}
    decoded = decode(batch([{"a": 0}, {"deep": value}]))
    assert decoded.dead_letters.num_rows == 0
    assert decoded.rows.num_rows == 2


def test_mixed_types_in_a_batch_dead_letter_the_later_rows() -> None:
    payloads: list[object] = [{"n": i, "k": "a"} for i in range(100)]
    payloads[40] = {"n": "forty", "k": "b"}
    payloads[70] = {"n": {"nested": 1}, "k": "c"}
    decoded = decode(batch(payloads))
    assert decoded.rows.schema.field("n").type == pa.int64()
    assert decoded.rows.num_rows == 98
    dead = decoded.dead_letters.to_pylist()
    assert [d["_nats_seq"] for d in dead] == [41, 71]
    assert all("the table or earlier messages of the batch" in d["error"] for d in dead)
    assert "field 'n' is string in this message but column 'n' is int64" in dead[0]["error"]
    assert "field 'n' is struct<nested: int64>" in dead[1]["error"]


def test_int_and_float_in_one_batch_become_double() -> None:
    decoded = decode(batch([{"x": 1}, {"x": 2.5}, "not an object"]))
    assert decoded.rows.schema.field("x").type == pa.float64()
    assert decoded.rows.column("x").to_pylist() == [1.0, 2.5]
    # the same when the slow path combines separately read parts
    payloads: list[object] = [{"x": 1}] * 50 + [b"bad"] + [{"x": 2.5}] * 50
    decoded = decode(batch(payloads))
    assert decoded.rows.schema.field("x").type == pa.float64()
    assert decoded.rows.num_rows == 100


def test_timestamp_like_strings_stay_strings() -> None:
    decoder = BatchDecoder()
    first = decoder.decode(
        batch([{"at": "2025-01-01T10:00:00+02:00", "o": {"d": "2025-01-02"}}, {"at": None}])
    )
    assert first.rows.schema.field("at").type == pa.string()
    assert first.rows.column("at").to_pylist() == ["2025-01-01T10:00:00+02:00", None]
    assert first.rows.column("o").to_pylist()[0] == {"d": "2025-01-02"}
    second = decoder.decode(batch([{"at": "2025-01-01T10:00:00.5Z", "x": 1}]))
    assert second.rows.schema.field("at").type == pa.string()
    nested = decoder.decode(batch([{"items": [{"at": "2025-01-01", "q": 1}]}]))
    assert nested.rows.column("items").to_pylist() == [[{"at": "2025-01-01", "q": 1}]]
    third = decoder.decode(batch([{"x": 2}]))
    assert "at" not in third.rows.column_names  # a remembered hint adds no phantom column
    assert "o" not in third.rows.column_names and "items" not in third.rows.column_names


@pytest.mark.parametrize("late", [False, True])
def test_a_first_large_batch_learns_its_string_hints_from_a_sample_with_the_same_result(
    late: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    # (``nilus_dagster.sink.decode`` as an attribute is the function the package exports.)
    decode_module = importlib.import_module("nilus_dagster.sink.decode")

    # Enough rows for the sample (its first 64 KB) to be a small part of the batch; with
    # ``late``, the timestamp-looking field only starts after the sample.
    payloads: list[object] = [
        {
            "i": i,
            "pad": "p" * 150,
            **({"at": f"2025-01-01T10:00:{i % 60:02d}Z"} if not late or i > 2000 else {}),
            "o": {"d": "2025-01-02"} if i % 2 else None,
        }
        for i in range(3000)
    ]
    sampled = BatchDecoder().decode(batch(payloads))
    monkeypatch.setattr(decode_module, "_HINT_SAMPLE_BYTES", 1 << 40)  # no sample: as before
    whole = BatchDecoder().decode(batch(payloads))
    assert sampled.rows.equals(whole.rows)
    assert sampled.rows.schema.field("at").type == pa.string()
    assert sampled.rows.column("o").type == pa.struct([("d", pa.string())])


def test_payload_field_named_like_a_metadata_column_is_overridden() -> None:
    rows = decode(batch([{"_nats_seq": "mine", "a": 1}], start=5)).rows
    assert rows.column("_nats_seq").to_pylist() == [5]
    assert rows.column_names.count("_nats_seq") == 1


def test_empty_object_and_empty_batch() -> None:
    rows = decode(batch([{}, {}])).rows
    assert rows.num_rows == 2
    assert rows.column_names == ["_nats_subject", "_nats_seq", "_nats_timestamp", "_nats_headers"]
    empty = decode(MessageBatch())
    assert empty.rows.num_rows == 0 and empty.dead_letters.num_rows == 0


def test_a_batch_of_only_poison() -> None:
    decoded = decode(batch([b"x", b"[]", b""], start=3))
    assert decoded.rows.num_rows == 0
    assert decoded.rows.column_names[-4:][1] == "_nats_seq"
    assert decoded.dead_letters.column("_nats_seq").to_pylist() == [3, 4, 5]


def test_a_large_batch_with_scattered_poison() -> None:
    payloads: list[object] = [{"id": i, "amount": i * 0.5} for i in range(20_000)]
    for i in (0, 7_777, 19_999):
        payloads[i] = b"{broken"
    payloads[12_345] = {"id": "twelve", "amount": 1.0}
    decoded = decode(batch(payloads))
    assert decoded.rows.num_rows == 19_996
    assert decoded.dead_letters.column("_nats_seq").to_pylist() == [1, 7778, 12346, 20000]
    ids = decoded.rows.column("id").to_pylist()
    assert ids[0] == 1 and ids[-1] == 19_998 and 12_345 not in ids


def test_validate_payload() -> None:
    assert validate_payload(b'{"a": 1}') is None
    assert validate_payload(b"{}") is None
    assert "not a JSON object" in (validate_payload(b"true") or "")


payload_strategy = st.one_of(
    st.fixed_dictionaries({"id": st.integers(0, 10**6), "s": st.text(max_size=5)}).map(
        lambda d: json.dumps(d).encode()
    ),
    st.sampled_from([b"", b"x", b"[]", b"1", b"{", b'{"id": "str"}', b"\xff", b' {"id": 1}']),
    st.binary(max_size=8),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payload_strategy, min_size=1, max_size=40))
def test_every_message_is_a_row_or_a_dead_letter_exactly_once(payloads: list[bytes]) -> None:
    b = batch(list(payloads))
    decoded = decode(b)
    kept = decoded.rows.column("_nats_seq").to_pylist()
    dead = decoded.dead_letters.column("_nats_seq").to_pylist()
    assert sorted(kept + dead) == b.sequences
    assert kept == sorted(kept)
    by_seq = dict(zip(b.sequences, b.payloads, strict=True))
    for letter in decoded.dead_letters.to_pylist():
        assert letter["_nats_data"] == by_seq[letter["_nats_seq"]]
    for seq, row in zip(kept, decoded.rows.to_pylist(), strict=True):
        original = json.loads(by_seq[seq])
        assert {k: row.get(k) for k in original} == original


def test_with_the_table_schema_the_table_type_decides_in_batch_conflicts() -> None:
    table = pa.schema([("n", pa.int64()), ("s", pa.struct([("a", pa.string())]))])
    payloads: list[object] = [{"n": "first but wrong"}, {"n": 2}, {"n": 3.5}, {"s": {"a": 1}}]
    decoded = decode(batch(payloads), table_schema=table)
    assert decoded.rows.column("n").to_pylist() == [2.0, 3.5]  # conform() judges 3.5
    assert decoded.dead_letters.column("_nats_seq").to_pylist() == [1, 4]
    without = decode(batch(payloads))  # no table yet: the earliest row decides
    assert without.rows.column("n").to_pylist()[0] == "first but wrong"


def test_two_interleaved_shapes_keep_stream_order() -> None:
    # Two producer versions interleaved (a rolling deploy): the earliest shape wins, the other
    # shape's messages are dead letters, and the slow path reads each shape as one part.
    payloads: list[object] = []
    for i in range(6000):
        if i % 3 == 2:
            payloads.append({"id": i, "amount": f"{i}.00", "o": {"k": "x"}})
        else:
            payloads.append({"id": i, "amount": i, "o": {"k": i}, "extra": None})
    payloads[4000] = b"{broken"
    decoded = decode(batch(payloads))
    kept = decoded.rows.column("id").to_pylist()
    assert kept == [i for i in range(6000) if i % 3 != 2 and i != 4000]
    assert decoded.rows.column("_nats_seq").to_pylist() == [i + 1 for i in kept]
    assert decoded.rows.schema.field("amount").type == pa.int64()
    dead = decoded.dead_letters.column("_nats_seq").to_pylist()
    assert dead == sorted([i + 1 for i in range(6000) if i % 3 == 2] + [4001])
