"""End to end: a service run under `dagster dev`, terminated, killed, and backfilled beside.

The supervisor sensor starts the service run; messages keep coming while a window backfill of
today runs beside it, the run is terminated through Dagster's GraphQL API (what the UI's
Terminate does) and the supervisor starts the next one, whose worker is then killed with
SIGKILL and replaced once its heartbeat goes silent. In the end every published sequence is in
the table exactly once.
"""

import os
import signal
import threading
import time
from datetime import datetime, timezone

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from dagster_dev import dagster_dev, wait_for, write_dagster_home
from dagster_graphql import DagsterGraphQLClient

from nilus_dagster.dagster import build_nilus_definitions
from nilus_dagster.dagster.constants import PID_TAG
from nilus_dagster.jetstream.local_server import free_port
from tests.checker import check_exactly_once

JOB = "nilus_service_nilus"


class _Publisher(threading.Thread):
    """Publishes batches of orders until stopped; keeps their sequences."""

    def __init__(self, publisher, subject: str, start: int):
        super().__init__(daemon=True)
        self.publisher, self.subject, self.next = publisher, subject, start
        self.seqs: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.seqs += self.publisher.publish_orders(self.subject, 20, start=self.next)
            self.next += 20
            time.sleep(0.2)


def _runs(instance, *statuses):
    return instance.get_runs(filters=dg.RunsFilter(job_name=JOB, statuses=list(statuses)))


@pytest.mark.slow
def test_service_run_terminated_killed_and_backfilled_under_dagster_dev(
    tmp_path, nats_server, publisher, stream_name, write_manifest
):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    (tmp_path / "pipelines").mkdir()
    path = write_manifest(
        name="orders",
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}&timeout=1",
        stream=stream_name,
        filename="pipelines/orders.yaml",
    )
    path.write_text(
        path.read_text()
        + "  dagster:\n    sensor_interval_seconds: 2\n"
        + "    service: {report_every_seconds: 2, poll_seconds: 0.2, heartbeat_seconds: 1, "
        + "run_seconds: 600}\n"
    )
    home = write_dagster_home(tmp_path / "dagster_home")
    uri = str(tmp_path / "lakehouse" / "lake" / "analytics" / "orders")
    first = publisher.publish_orders(subject, 100)
    port = free_port()
    env = {**os.environ, "NILUS_PIPELINES": str(tmp_path / "pipelines")}
    feeder = _Publisher(publisher, subject, start=100)
    with (
        dagster_dev(home, env, tmp_path, port) as log,
        dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance,
    ):
        [run] = wait_for(
            lambda: _runs(instance, dg.DagsterRunStatus.STARTED), "a service run", log, 120
        )
        wait_for(lambda: check_exactly_once(uri, first, "nilus-dagster/orders").ok, "rows", log, 60)
        feeder.start()

        # A window backfill of today, beside the running service, through Dagster.
        defs = build_nilus_definitions(tmp_path / "pipelines")
        today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        backfill = dg.materialize(
            [defs.get_assets_def("orders")],
            instance=instance,
            resources=defs.resources,
            partition_key=today,
        )
        assert backfill.success

        # Terminate through Dagster: the run stops quickly, the supervisor starts the next.
        asked = time.monotonic()
        assert DagsterGraphQLClient("127.0.0.1", port_number=port).terminate_run(run.run_id) is None
        wait_for(
            lambda: instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED,
            "the terminated run to end as canceled",
            log,
            30,
        )
        stop_seconds = time.monotonic() - asked
        [second] = wait_for(
            lambda: [
                r for r in _runs(instance, dg.DagsterRunStatus.STARTED) if r.run_id != run.run_id
            ],
            "the supervisor's next service run",
            log,
            60,
        )
        pid = int(
            wait_for(
                lambda: instance.get_run_by_id(second.run_id).tags.get(PID_TAG), "pid", log, 30
            )
        )

        # kill -9 the worker: Dagster is not told; the silent heartbeat gives it away.
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: [
                r
                for r in _runs(instance, dg.DagsterRunStatus.STARTED)
                if r.run_id not in (run.run_id, second.run_id)
            ],
            "a replacement for the killed run",
            log,
            90,
        )
        assert instance.get_run_by_id(second.run_id).status == dg.DagsterRunStatus.FAILURE

        feeder.stopped.set()
        feeder.join()
        published = first + feeder.seqs
        wait_for(
            lambda: check_exactly_once(uri, published, "nilus-dagster/orders").ok,
            "every published message in the table",
            log,
            60,
        )
    check = check_exactly_once(uri, published, "nilus-dagster/orders")
    assert check.ok, check
    assert stop_seconds < 20, f"the terminated run took {stop_seconds:.1f}s to end"
    print(f"terminate took {stop_seconds:.1f}s; {len(published)} messages, each once")
