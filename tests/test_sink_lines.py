"""The decoder's join of payloads into JSON lines: the compiled one against the Python one."""

import importlib

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import lines
from nilus_dagster.sink.decode import BatchDecoder

compiled = pytest.mark.skipif(not lines.COMPILED, reason="_lines was not built (no C compiler)")


objects = st.builds(lambda body: b"{" + body, st.binary(max_size=40))
anything = st.one_of(objects, st.binary(max_size=40), st.sampled_from([b"", b"{\n}", b"{\r}"]))


@compiled
@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(objects, objects, anything), max_size=20))
def test_both_joins_agree_on_any_payloads(payloads):
    assert lines.join_lines_compiled(payloads) == lines.join_lines_python(payloads)


@pytest.mark.parametrize("join", ["compiled", "python"])
@pytest.mark.parametrize(
    "payloads",
    [
        [],
        [b""],
        [b'{"a":1}', b""],
        [b'{"a":1}', b' {"a":2}'],  # Arrow would skip the space; the rule is a '{' first
        [b'[{"a":1}]'],
        [b'{"a":1}', b'{"a":\n2}'],
        [b'{"a":1}\r'],
        [b'{"a":1}', b"{}\n{}"],  # two lines in one payload: rows no longer match messages
    ],
    ids=["none", "empty", "empty-last", "leading-space", "array", "lf", "cr", "two-objects"],
)
def test_payloads_arrow_could_misalign_are_refused(join, payloads):
    if join == "compiled" and not lines.COMPILED:
        pytest.skip("_lines was not built (no C compiler)")
    join_lines = lines.join_lines_compiled if join == "compiled" else lines.join_lines_python

    assert join_lines(payloads) is None


@pytest.mark.parametrize("join", ["compiled", "python"])
def test_a_join_says_how_long_the_longest_payload_is_and_whether_all_is_ascii(join):
    if join == "compiled" and not lines.COMPILED:
        pytest.skip("_lines was not built (no C compiler)")
    join_lines = lines.join_lines_compiled if join == "compiled" else lines.join_lines_python

    assert join_lines([b'{"a":1}', b'{"b":"xyz"}']) == (b'{"a":1}\n{"b":"xyz"}', 11, True)
    assert join_lines([b'{"a":1}', '{"é":2}'.encode()]) == (
        b'{"a":1}\n' + '{"é":2}'.encode(),
        8,  # bytes, not characters
        False,
    )
    assert join_lines([b'{"bad":"\xff"}']).ascii is False  # UTF-8 is the decoder's check


class ShortBytes(bytes):
    def __len__(self) -> int:
        return 1


@compiled
@pytest.mark.parametrize(
    "payloads",
    [
        (b'{"a":1}', bytearray(b'{"a":2}'), memoryview(b'{"a":3}')),
        [b'{"a":1}', ShortBytes(b'{"a":2}')],  # a subclass's own length counts, as in Python
    ],
    ids=["bytes-like", "subclass"],
)
def test_the_compiled_join_takes_payloads_that_are_not_exactly_bytes_as_python_does(payloads):
    assert lines.join_lines_compiled(payloads) == lines.join_lines_python(payloads)
    assert lines.join_lines_compiled(payloads) is not None


@compiled
@pytest.mark.parametrize("payloads", [[b"", "x"], [b"x", None]], ids=["str", "none"])
def test_an_item_that_is_not_bytes_fails_both_joins_even_after_a_refused_payload(payloads):
    with pytest.raises(TypeError):
        lines.join_lines_python(payloads)
    with pytest.raises(TypeError):
        lines.join_lines_compiled(payloads)


@pytest.mark.parametrize("join", ["compiled", "python"])
def test_the_decoder_reads_the_same_rows_and_dead_letters_with_either_join(join, monkeypatch):
    if join == "compiled" and not lines.COMPILED:
        pytest.skip("_lines was not built (no C compiler)")
    chosen = lines.join_lines_compiled if join == "compiled" else lines.join_lines_python
    # The package exports a decode() function of the same name as the module.
    monkeypatch.setattr(importlib.import_module("nilus_dagster.sink.decode"), "join_lines", chosen)
    good = [b'{"id":%d,"tags":["a","b"],"who":{"name":"n%d"}}' % (i, i) for i in range(50)]
    bad = [b"", b"not json", b'{"id":"\xff"}', b'{"id":7}\n{"id":8}']
    times = [1_700_000_000_000_000_000 + i for i in range(54)]

    clean = BatchDecoder().decode(MessageBatch(list(range(1, 51)), times[:50], ["s"] * 50, good))
    mixed = BatchDecoder().decode(
        MessageBatch(list(range(1, 55)), times, ["s"] * 54, good[:25] + bad + good[25:])
    )

    assert clean.rows.column("id").to_pylist() == list(range(50))
    assert clean.dead_letters.num_rows == 0
    assert clean.rows.schema.field("who").type == pa.struct([("name", pa.string())])
    assert mixed.rows.column("id").to_pylist() == list(range(50))
    assert mixed.rows.column("_nats_seq").to_pylist() == [*range(1, 26), *range(30, 55)]
    assert mixed.dead_letters.column("_nats_seq").to_pylist() == [26, 27, 28, 29]
