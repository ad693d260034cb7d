"""A Jepsen-style queue checker: what was published against what the table holds."""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from deltalake import DeltaTable


@dataclass
class CheckResult:
    """Lost, duplicated and unexpected sequences, and whether the position matches the data."""

    published: int
    in_table: int
    in_dead_letters: int
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    unexpected: list[int] = field(default_factory=list)
    position: int | None = None
    last_written: int | None = None

    @property
    def position_matches(self) -> bool:
        return self.position == self.last_written

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected) and self.position_matches

    def __str__(self) -> str:
        return (
            f"published={self.published} table={self.in_table} dead={self.in_dead_letters} "
            f"lost={self.lost[:10]}{'...' if len(self.lost) > 10 else ''} "
            f"duplicated={self.duplicated[:10]} unexpected={self.unexpected[:10]} "
            f"position={self.position} last_written={self.last_written}"
        )


def _sequences(uri: str) -> list[int]:
    try:
        table = DeltaTable(uri)
    except Exception:  # no table yet: nothing written
        return []
    column = table.to_pyarrow_table(columns=["_nats_seq"])["_nats_seq"]
    return [int(v) for v in column.to_pylist()]


def check_exactly_once(
    table_uri: str,
    published: Iterable[int],
    app_id: str,
    *,
    expect_dead: Iterable[int] = (),
) -> CheckResult:
    """Compare published sequences with the table and its dead letters.

    Every published sequence must be in the table or the dead letters exactly once, nothing
    else may be there, and the committed position must equal the last sequence written.
    """
    published_set = set(published)
    rows = _sequences(table_uri)
    dead = _sequences(table_uri + "__dead_letters")
    counts = Counter(rows + dead)
    result = CheckResult(
        published=len(published_set), in_table=len(rows), in_dead_letters=len(dead)
    )
    result.lost = sorted(published_set - set(counts))
    result.duplicated = sorted(s for s, n in counts.items() if n > 1)
    result.unexpected = sorted(set(counts) - published_set)
    missing_dead = set(expect_dead) - set(dead)
    result.lost.extend(sorted(missing_dead - set(result.lost)))
    try:
        result.position = DeltaTable(table_uri).transaction_version(app_id)
    except Exception:
        result.position = None
    written = rows + dead
    result.last_written = max(written) if written else None
    return result
