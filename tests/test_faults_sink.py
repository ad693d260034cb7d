"""The sink's storage fails under a run: a full filesystem (a 2 MB tmpfs as the lakehouse).

Tests run as root, so file modes cannot make a folder read-only; a tiny filesystem fails real
writes instead. The run must fail with a clear SinkError, commit nothing wrongly, and a re-run
after the fault clears (the filesystem grown) must complete exactly once.
"""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from checker import check_exactly_once, check_orders
from conftest import order

from nilus_dagster.engine import run_pipeline
from nilus_dagster.errors import SinkError


@pytest.fixture(params=["2m/1000", "1200k/333"])
def tiny_lakehouse(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, int]]:
    """A tiny tmpfs mounted as NILUS_LAKEHOUSE, and the commit size to use with it (sizes vary
    where the space runs out: a data file, the dead letters, the log). Skipped where mounting
    is not allowed."""
    size, rows = request.param.split("/")
    folder = tmp_path / "tiny-lake"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    monkeypatch.setenv("NILUS_LAKEHOUSE", str(folder))
    try:
        yield folder, int(rows)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _grow(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=256m", str(folder)], check=True)


def _incompressible(i: int) -> dict[str, object]:
    return {**order(i), "blob": os.urandom(150).hex()}


def test_full_filesystem_fails_the_run_cleanly_and_a_rerun_completes(
    tiny_lakehouse, publisher, stream_pipeline
):
    folder, commit_rows = tiny_lakehouse
    subject, pipeline = stream_pipeline(
        query="&batch_size=250",
        sink_options=f"commit_max_rows: {commit_rows}\ncheckpoint_every: 0\n",
    )
    payloads = [b"poison %d" % i if i % 50 == 7 else _incompressible(i) for i in range(12_000)]
    published = publisher.publish(subject, payloads)

    with pytest.raises(SinkError) as failed:
        run_pipeline(pipeline, drain=True)

    message = str(failed.value)
    assert "No space left on device" in message or "space" in message.lower(), message
    assert pipeline.table_location().uri in message or "dead_letters" in message, message
    table = pipeline.table_location().uri
    partial = check_exactly_once(table, published, pipeline.app_id)
    # Nothing committed wrongly: everything up to the position, nothing twice. Dead letters
    # are committed first, under their own position, so they may run ahead of the rows.
    position = partial.position or 0
    assert position < published[-1] and not (partial.duplicated or partial.unexpected), partial
    assert not [s for s in partial.lost if s <= position], str(partial)

    # Still full: the next run fails the same way and changes nothing.
    with pytest.raises(SinkError):
        run_pipeline(pipeline, drain=True)
    assert check_exactly_once(table, published, pipeline.app_id).position == partial.position

    _grow(folder)
    report = run_pipeline(pipeline, drain=True)

    assert report.position == published[-1]
    result = check_orders(table, published, pipeline.app_id, payloads)
    assert result.ok, str(result)
