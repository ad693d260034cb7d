"""Two runs of one pipeline at once, as separate processes (the CLI), with poison payloads.

Dagster's pool keeps one run per pipeline, but nothing stops a CLI backfill next to a sensor
run. The table's position is read and written through one snapshot, so the slower writer's
commit conflicts, re-reads the position and writes only what is still its own.
"""

import os
import subprocess
import sys

import pytest
from checker import check_exactly_once, consumer_state, order_keys
from conftest import order

from nilus_dagster.manifest import parse_pipeline


def _payloads(start: int, count: int) -> list[bytes | dict[str, object]]:
    return [b"{broken %d" % i if i % 41 == 3 else order(i) for i in range(start, start + count)]


SHARED_DURABLE_BUG = (
    "known bug: two runs pulling from one durable consumer at once can lose messages (one "
    "run's deliveries go to the other's pull requests and neither commits them; measured about "
    "1 round in 6 under load) and leave the ack floor behind the table; see docs/reliability.md"
)


@pytest.mark.parametrize(
    "query",
    [
        "",
        pytest.param(
            "&durable=nilus_twice&ack_policy=all",
            marks=pytest.mark.xfail(strict=False, reason=SHARED_DURABLE_BUG),
        ),
    ],
)
def test_two_processes_running_one_pipeline_write_every_sequence_once(
    nats_server, publisher, stream_name, write_manifest, query
):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    path = write_manifest(
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}&batch_size=200{query}",
        stream=stream_name,
        extra_sink_options="commit_max_rows: 400\ncheckpoint_every: 0\n",
    )
    pipeline = parse_pipeline(path)
    published: list[int] = []
    payloads: list[bytes | dict[str, object]] = []
    conflicts = 0
    for round_ in range(3):
        batch = _payloads(round_ * 6_000, 6_000)
        published += publisher.publish(subject, batch)
        payloads += batch
        runs = [
            subprocess.Popen(
                [sys.executable, "-m", "nilus_dagster.cli", "run", str(path), "--drain"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=os.environ.copy(),
            )
            for _ in range(2)
        ]
        outputs = [run.communicate(timeout=120) for run in runs]
        for run, (_, err) in zip(runs, outputs, strict=True):
            assert run.returncode == 0, err
            conflicts += err.count("a concurrent commit moved the position")

    assert conflicts, "the two runs never overlapped"
    poison = [s for s, p in zip(published, payloads, strict=True) if isinstance(p, bytes)]
    result = check_exactly_once(
        pipeline.table_location().uri,
        published,
        pipeline.app_id,
        expect_dead=poison,
        keys=order_keys(published, payloads),
        key_column="order_id",
    )
    assert result.ok, str(result)
    if query:
        state = consumer_state(nats_server.url, stream_name, "nilus_twice")
        assert state["ack_floor"] == published[-1], state
