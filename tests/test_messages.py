"""MessageBatch: the column batch every layer hands on, cut and joined without losing order."""

from nilus_dagster.messages import MessageBatch


def _batch(first: int, count: int, *, headers: bool = False) -> MessageBatch:
    seqs = list(range(first, first + count))
    return MessageBatch(
        sequences=seqs,
        timestamps_ns=[s * 1_000 for s in seqs],
        subjects=[f"orders.{s % 2}" for s in seqs],
        payloads=[b'{"n":%d}' % s for s in seqs],
        headers=[{"n": str(s)} if s % 3 == 0 else None for s in seqs] if headers else None,
        num_pending=7,
    )


def test_slice_is_the_messages_between_two_indexes_in_every_column():
    batch = _batch(10, 8, headers=True)

    part = batch.slice(2, 5)

    assert part.sequences == [12, 13, 14]
    assert part.timestamps_ns == [12_000, 13_000, 14_000]
    assert part.subjects == ["orders.0", "orders.1", "orders.0"]
    assert part.payloads == [b'{"n":12}', b'{"n":13}', b'{"n":14}']
    assert part.headers == [{"n": "12"}, None, None]
    assert (part.first_seq, part.last_seq, part.num_pending) == (12, 14, 7)
    assert len(batch) == 8  # the batch itself is left as it was


def test_split_and_after_agree_with_slice():
    batch = _batch(1, 6)

    head, tail = batch.split(4)

    assert head.sequences == batch.slice(0, 4).sequences == [1, 2, 3, 4]
    assert tail.sequences == batch.slice(4, 6).sequences == [5, 6]
    assert batch.after(3).payloads == batch.slice(3, 6).payloads
    assert batch.after(0) is batch  # nothing at or below the position: no copy


def test_extend_keeps_headers_aligned_when_only_one_side_has_them():
    batch = _batch(1, 3)
    batch.extend(_batch(4, 3, headers=True))

    assert batch.sequences == [1, 2, 3, 4, 5, 6]
    assert batch.headers == [None, None, None, None, None, {"n": "6"}]
    assert batch.nbytes == sum(len(p) for p in batch.payloads)
