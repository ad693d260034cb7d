"""Soak: every fault at random while messages keep arriving; run by hand, not in CI.

    NILUS_SOAK_SECONDS=600 .venv/bin/python -m pytest -s tests/test_faults_soak.py

A publisher thread publishes orders with unique ids for the whole soak, each with a
``Nats-Msg-Id`` so that a retry after a lost ack is stored once, and retries until acked (it
rides out server kills and pauses). Meanwhile pipeline runs (CLI subprocesses, ``--drain``)
follow one another and a nemesis picks one fault per round: SIGKILL the run, SIGKILL and
restart the server, SIGSTOP and SIGCONT the server, a second run at once, or none. At the end
the faults stop, a last run drains, and the checker compares every acked publish (sequence
and order id) with the table. A summary of the faults and outcomes is printed.
"""

import asyncio
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest
from checker import check_exactly_once, consumer_state
from conftest import order, start_cli_run

from nilus_dagster.engine import run_pipeline
from nilus_dagster.manifest import parse_pipeline

SECONDS = float(os.environ.get("NILUS_SOAK_SECONDS", "0") or 0)
STREAM = "SOAK"
SUBJECT = "soak.orders"
DURABLE = "nilus_soak"

pytestmark = pytest.mark.skipif(
    not SECONDS, reason="a manual soak: set NILUS_SOAK_SECONDS (see docs/reliability.md)"
)


class _Publisher(threading.Thread):
    """Publishes orders until stopped; every publish retried until acked."""

    def __init__(self, url: str, rate: float):
        super().__init__(daemon=True)
        self.url = url
        self.rate = rate
        self.stop = threading.Event()
        self.acked: dict[int, str] = {}  # stream sequence -> order id
        self.retries = 0

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        import nats

        nc = await nats.connect(
            self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2
        )
        js = nc.jetstream(timeout=2)
        await js.add_stream(name=STREAM, subjects=["soak.>"], duplicate_window=120)
        i = 0
        try:
            while not self.stop.is_set():
                payload = order(i)
                data = json.dumps(payload).encode()
                while True:
                    try:
                        ack = await js.publish(
                            SUBJECT, data, headers={"Nats-Msg-Id": str(payload["order_id"])}
                        )
                        break
                    except Exception:  # server down or paused: the same id again
                        self.retries += 1
                        await asyncio.sleep(0.1)
                self.acked[ack.seq] = str(payload["order_id"])
                i += 1
                await asyncio.sleep(1 / self.rate)
        finally:
            await nc.close()


@pytest.mark.timeout(SECONDS + 600)  # the suite's per-test limit would end a long soak
@pytest.mark.parametrize("query", ["", f"&durable={DURABLE}&ack_policy=all"])
def test_soak(nats_server_factory, write_manifest, query):
    rng = random.Random(int(os.environ.get("NILUS_SOAK_SEED", "1")))
    server = nats_server_factory()
    publisher = _Publisher(server.url, rate=float(os.environ.get("NILUS_SOAK_RATE", "2000")))
    publisher.start()
    time.sleep(1)
    path = str(
        write_manifest(
            address=f"nats+jetstream://{server.hostport}?subject={SUBJECT}&batch_size=500{query}",
            stream=STREAM,
            extra_sink_options="commit_max_rows: 2000\n",
        )
    )
    faults: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        fault = rng.choice(["none", "kill-run", "kill-server", "pause-server", "two-runs"])
        faults[fault] += 1
        runs = [
            start_cli_run(path, stderr=subprocess.PIPE)
            for _ in range(2 if fault == "two-runs" else 1)
        ]
        time.sleep(rng.uniform(0.05, 1.5))
        if fault == "kill-run":
            runs[0].send_signal(signal.SIGKILL)
        elif fault == "kill-server":
            server.kill()
            time.sleep(rng.uniform(0.1, 2.0))
            server.start()
        elif fault == "pause-server":
            server.pause()
            time.sleep(rng.uniform(0.5, 15.0))
            server.resume()
        for run in runs:
            try:
                _, err = run.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                run.kill()
                _, err = run.communicate()
                outcomes["hung (killed after 120 s)"] += 1
                continue
            code = run.returncode
            if code == 0:
                outcomes["ok"] += 1
            elif code == -signal.SIGKILL:
                outcomes["killed"] += 1
            else:
                reason = err.strip().splitlines()[-1:] or ["?"]
                outcomes[f"failed: {reason[0][:120]}"] += 1

    publisher.stop.set()
    publisher.join(60)
    pipeline = parse_pipeline(path)
    report = run_pipeline(pipeline, drain=True)
    acked = publisher.acked
    result = check_exactly_once(
        report.table_uri, list(acked), pipeline.app_id, keys=acked, key_column="order_id"
    )
    print(
        f"\nsoak {SECONDS:.0f}s {query or 'ephemeral'}: {len(acked)} acked publishes "
        f"({publisher.retries} publish retries); faults {dict(faults)}; runs {dict(outcomes)}; "
        f"checker: {result}"
    )
    assert "hung (killed after 120 s)" not in outcomes
    assert result.ok, str(result)
    if query:
        state = consumer_state(server.url, STREAM, DURABLE)
        assert state["delivered"] == state["ack_floor"] == report.position, state
