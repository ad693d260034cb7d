"""The reliability suite's faults that make sense for a database, against the PostgreSQL sink.

Each test runs whole pipelines (the engine, or the CLI in a process it kills) into a fresh
database and ends with the checker: every published sequence in the table or its dead letters
exactly once, and the position row equal to the last sequence written.
"""

import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from checker import check_exactly_once, check_orders
from conftest import Publisher, order, start_cli_run
from own_postgres import OwnPostgres, find_bin_dir

from nilus_dagster.engine import run_pipeline
from nilus_dagster.errors import SinkError
from nilus_dagster.manifest import parse_pipeline

SMALL_COMMITS = "commit_max_rows: 500\n"


def _payloads(
    count: int, start: int = 0, poison_every: int = 97
) -> list[bytes | dict[str, object]]:
    return [
        b"poison %d" % i if i % poison_every == 5 else order(i) for i in range(start, start + count)
    ]


def _position(db, pipeline) -> int:  # type: ignore[no-untyped-def]
    try:
        found = db.query(
            "SELECT last_seq FROM analytics.nilus_positions WHERE pipeline = %s",
            (pipeline.app_id,),
        )
    except Exception:  # not created yet
        return 0
    return int(found[0][0]) if found else 0


def _wait(condition, process: subprocess.Popen[str], timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_a_run_into_postgresql_writes_every_order_once_with_its_dead_letters(
    postgres_database, publisher, stream_pipeline
):
    subject, pipeline = stream_pipeline(sink_address=postgres_database.url)
    payloads = _payloads(3_000)
    published = publisher.publish(subject, payloads)
    report = run_pipeline(pipeline, drain=True)

    assert report.position == published[-1]
    assert report.row_count == report.rows_written == 3_000 - report.dead_letters
    assert report.table_uri.endswith("?table=analytics.orders")
    assert report.lag_seconds is not None and report.sequence_lag == 0
    result = check_orders(report.table_uri, published, pipeline.app_id, payloads)
    assert result.ok, str(result)
    again = run_pipeline(pipeline, drain=True)
    assert again.messages == 0 and again.row_count == report.row_count


@pytest.mark.parametrize("when", ["inside the transaction", "just after the commit"])
def test_sigkill_inside_or_after_a_commit_loses_and_duplicates_nothing(
    postgres_database, publisher, stream_pipeline, when
):
    db = postgres_database
    subject, pipeline = stream_pipeline(
        query="&batch_size=250", sink_address=db.url, sink_options=SMALL_COMMITS
    )
    payloads = _payloads(500)
    published = publisher.publish(subject, payloads)
    run_pipeline(pipeline, drain=True)  # creates the table and its dead letters
    more = _payloads(10_000, start=500)
    published += publisher.publish(subject, more)
    payloads += more

    for _ in range(1 if when == "inside the transaction" else 2):
        before = _position(db, pipeline)
        holder = None
        if when == "inside the transaction":
            # The run's dead-letter COPY waits on this lock after its rows were loaded: the
            # kill lands between the rows and the commit.
            import psycopg

            holder = psycopg.connect(db.url)
            holder.execute("LOCK TABLE analytics.orders__dead_letters IN ACCESS EXCLUSIVE MODE")
        process = start_cli_run(pipeline.path)
        if holder is not None:
            waiting = _wait(lambda: _lock_waiters(db) > 0, process)
            assert waiting, "the run never waited on the dead-letter table"
        else:
            assert _wait(lambda: _position(db, pipeline) > before, process)  # noqa: B023
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        if holder is not None:
            holder.rollback()
            holder.close()
            assert _position(db, pipeline) == before

    report = run_pipeline(pipeline, drain=True)
    result = check_orders(report.table_uri, published, pipeline.app_id, payloads)
    assert result.ok, str(result)


def _connections(db) -> int:  # type: ignore[no-untyped-def]
    """Sessions on the test's database other than the asking one."""
    return int(
        db.query(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (db.name,),
        )[0][0]
    )


def _lock_waiters(db) -> int:  # type: ignore[no-untyped-def]
    return int(
        db.query(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (db.name,),
        )[0][0]
    )


def test_two_processes_running_one_pipeline_write_every_sequence_once(
    postgres_database, publisher, stream_pipeline
):
    subject, pipeline = stream_pipeline(
        query="&batch_size=200",
        sink_address=postgres_database.url,
        sink_options="commit_max_rows: 400\n",
    )
    published: list[int] = []
    payloads: list[bytes | dict[str, object]] = []
    conflicts = 0
    for round_ in range(2):
        batch = _payloads(6_000, start=round_ * 6_000, poison_every=41)
        published += publisher.publish(subject, batch)
        payloads += batch
        runs = [
            start_cli_run(pipeline.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        for run in runs:
            _, err = run.communicate(timeout=120)
            assert run.returncode == 0, err
            conflicts += err.count("a concurrent commit moved the position")

    assert conflicts, "the two runs never overlapped"
    result = check_orders(pipeline.table_location().uri, published, pipeline.app_id, payloads)
    assert result.ok, str(result)


def test_schema_drift_and_poison_become_columns_and_dead_letters(
    postgres_database, publisher, stream_pipeline
):
    db = postgres_database
    subject, pipeline = stream_pipeline(sink_address=db.url)
    first = [{"order_id": f"o{i}", "amount": 1.0 * i} for i in range(50)]
    drift = [
        {"order_id": "o50", "amount": 2.5, "coupon": "NEW"},  # a new field: a new column
        {"order_id": "o51", "amount": "free"},  # text where the table has double precision
        {"order_id": "o52", "amount": {"value": 1}},  # an object there
        b"\xff\xfe not utf-8",
        b"[1, 2]",  # JSON, but not an object
        {"order_id": "o55", "amount": 3},  # an integer into double precision: cast
    ]
    published = publisher.publish(subject, first)
    run_pipeline(pipeline)
    published += publisher.publish(subject, drift)
    report = run_pipeline(pipeline, drain=True)

    result = check_exactly_once(
        report.table_uri, published, pipeline.app_id, expect_dead=published[51:55]
    )
    assert result.ok, str(result)
    assert db.query("SELECT coupon, amount FROM analytics.orders WHERE order_id = 'o50'") == [
        ("NEW", 2.5)
    ]
    assert db.query("SELECT amount FROM analytics.orders WHERE order_id = 'o55'") == [(3.0,)]


def test_merge_pipeline_keeps_the_latest_message_per_key(
    postgres_database, publisher, stream_pipeline
):
    db = postgres_database
    subject, pipeline = stream_pipeline(
        sink_address=db.url,
        sink_options="incremental_strategy: merge\nprimary_key: order_id\n",
    )
    updates = [{"order_id": f"o{i % 10}", "version": i} for i in range(100)]
    published = publisher.publish(subject, updates)
    report = run_pipeline(pipeline, drain=True)
    assert report.position == published[-1]
    rows = db.query("SELECT order_id, version, _nats_seq FROM analytics.orders ORDER BY order_id")
    assert rows == [(f"o{k}", 90 + k, published[90 + k]) for k in range(10)]


def test_nats_server_killed_and_restarted_mid_run(
    postgres_database, nats_server_factory, write_manifest
):
    db = postgres_database
    server = nats_server_factory()
    publisher = Publisher(server.url)
    publisher.create_stream("PGFAULTS", ["pgfaults.>"])
    published = publisher.publish_orders("pgfaults.orders", 15_000)
    path = write_manifest(
        address=f"nats+jetstream://{server.hostport}?subject=pgfaults.orders&batch_size=250",
        stream="PGFAULTS",
        sink_address=db.url,
        extra_sink_options=SMALL_COMMITS,
    )
    pipeline = parse_pipeline(path)
    outcome: list[object] = []
    run = threading.Thread(target=lambda: outcome.append(_attempt(pipeline)), daemon=True)
    run.start()
    kills = 0
    for _ in range(2):
        before = _position(db, pipeline)
        deadline = time.monotonic() + 30
        while _position(db, pipeline) <= before and run.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        if not run.is_alive():
            break
        server.kill()
        kills += 1
        time.sleep(0.5)
        server.start()
    run.join(90)

    assert kills >= 1, "the run finished before the server could be killed; publish more"
    report = outcome[0]
    assert not isinstance(report, BaseException), repr(report)
    keys = {seq: order(i)["order_id"] for i, seq in enumerate(published)}
    result = check_exactly_once(
        report.table_uri, published, pipeline.app_id, keys=keys, key_column="order_id"
    )
    assert result.ok, str(result)


def _attempt(pipeline):  # type: ignore[no-untyped-def]
    try:
        return run_pipeline(pipeline, drain=True)
    except BaseException as exc:  # asserted by the test
        return exc


@pytest.fixture(scope="session")
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL server of the session's own (the shared one is never restarted)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail("PostgreSQL's initdb and pg_ctl are not installed: apt-get install postgresql")
    server = OwnPostgres(bin_dir).init()
    server.start()
    yield server
    server.destroy()


def _own_position(url: str, pipeline) -> int:  # type: ignore[no-untyped-def]
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            found = conn.execute(
                "SELECT last_seq FROM analytics.nilus_positions WHERE pipeline = %s",
                (pipeline.app_id,),
            ).fetchone()
    except psycopg.Error:  # not created yet, or the server is restarting
        return 0
    return int(found[0]) if found else 0


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restarted_mid_run(own_postgres, publisher, stream_pipeline, mode):
    import psycopg

    pg = own_postgres
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE restart_{mode}")  # type: ignore[arg-type]
    url = pg.url(f"restart_{mode}")
    subject, pipeline = stream_pipeline(
        query="&batch_size=250", sink_address=url, sink_options=SMALL_COMMITS
    )
    payloads = _payloads(40_000)
    published = publisher.publish(subject, payloads)
    outcome: list[object] = []
    run = threading.Thread(target=lambda: outcome.append(_attempt(pipeline)), daemon=True)
    run.start()
    deadline = time.monotonic() + 30
    while _own_position(url, pipeline) == 0 and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    pg.stop(mode)  # fast: sessions ended, transactions rolled back; immediate: a crash
    pg.start()
    at_restart = _own_position(url, pipeline)
    run.join(60)

    assert 0 < at_restart < published[-1], "the run ended before the restart; publish more"
    first = outcome[0]
    if isinstance(first, BaseException):
        # Failing is fine if it says what happened; nothing committed may be lost.
        assert isinstance(first, SinkError), repr(first)
        assert "connection to PostgreSQL was lost" in str(first), str(first)
    report = run_pipeline(pipeline, drain=True)
    assert report.position == published[-1]
    result = check_orders(report.table_uri, published, pipeline.app_id, payloads)
    assert result.ok, str(result)


@pytest.mark.timeout(90)
def test_a_unique_index_of_the_users_that_refuses_rows_fails_the_run_and_loses_nothing(
    postgres_database, publisher, stream_pipeline
):
    db = postgres_database
    subject, pipeline = stream_pipeline(sink_address=db.url)
    first = publisher.publish(subject, [{"order_id": f"o{i}", "n": i} for i in range(10)])
    run_pipeline(pipeline, drain=True)
    # Named like a system catalog's index, which a concurrent CREATE would violate: the
    # server's diagnostics, not the name, tell the two apart.
    db.query("CREATE UNIQUE INDEX pg_orders_by_id ON analytics.orders (order_id)")
    again = publisher.publish(subject, [{"order_id": f"o{i}", "n": 10 + i} for i in range(5)])

    # Not a retry loop: the index refuses the same rows on every attempt.
    with pytest.raises(SinkError) as refused:
        run_pipeline(pipeline, drain=True)
    message = str(refused.value)
    assert "orders_by_id" in message and "unique" in message
    assert "incremental_strategy: merge" in message
    assert _position(db, pipeline) == first[-1]

    db.query("DROP INDEX analytics.pg_orders_by_id")
    report = run_pipeline(pipeline, drain=True)
    assert report.position == again[-1]
    result = check_exactly_once(report.table_uri, first + again, pipeline.app_id)
    assert result.ok, str(result)


@pytest.mark.timeout(90)
def test_switching_to_merge_on_a_table_with_repeated_keys_says_what_to_do(
    postgres_database, publisher, stream_pipeline
):
    db = postgres_database
    subject, appending = stream_pipeline(sink_address=db.url)
    published = publisher.publish(subject, [{"order_id": f"o{i % 3}", "n": i} for i in range(6)])
    run_pipeline(appending, drain=True)
    more = publisher.publish(subject, [{"order_id": "o1", "n": 6}])
    appending.path.write_text(
        appending.path.read_text().replace(
            "incremental_strategy: append",
            "incremental_strategy: merge\n      primary_key: order_id",
        )
    )
    merging = parse_pipeline(appending.path)

    with pytest.raises(SinkError) as refused:
        run_pipeline(merging, drain=True)
    message = str(refused.value)
    assert "order_id" in message and "duplicate" in message.lower()
    assert _position(db, merging) == published[-1] < more[-1]
    assert db.query("SELECT count(*) FROM analytics.orders") == [(6,)]


@pytest.mark.timeout(90)
def test_commits_that_keep_conflicting_fail_the_run_after_a_bounded_number_of_attempts(
    postgres_database, publisher, stream_pipeline, monkeypatch
):
    from nilus_dagster.engine import committer
    from nilus_dagster.sink import PositionConflict
    from nilus_dagster.sink.postgres import PostgresSink

    db = postgres_database
    subject, pipeline = stream_pipeline(sink_address=db.url)
    published = publisher.publish(subject, [order(i) for i in range(20)])
    attempts: list[int] = []

    def conflicting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.discard_ahead()
        attempts.append(self.position)
        raise PositionConflict("another writer changed the table (injected)")

    monkeypatch.setattr(committer, "COMMIT_ATTEMPTS", 3)
    with monkeypatch.context() as patched:
        patched.setattr(PostgresSink, "commit", conflicting)
        with pytest.raises(SinkError, match=r"3 commits of the same rows.*injected"):
            run_pipeline(pipeline, drain=True)
    assert attempts == [0, 0, 0]
    assert _position(db, pipeline) == 0

    report = run_pipeline(pipeline, drain=True)
    assert report.position == published[-1]
    result = check_exactly_once(report.table_uri, published, pipeline.app_id)
    assert result.ok, str(result)


def test_sigkill_at_random_points_from_the_first_commit_on_loses_and_duplicates_nothing(
    postgres_database, publisher, stream_pipeline
):
    db = postgres_database
    subject, pipeline = stream_pipeline(
        query="&batch_size=500", sink_address=db.url, sink_options=SMALL_COMMITS
    )
    payloads = _payloads(30_000)
    published = publisher.publish(subject, payloads)
    rng = random.Random(11)
    positions = []
    for attempt in range(5):
        before = _position(db, pipeline)
        process = start_cli_run(pipeline.path)
        if attempt == 0:
            # From the moment the run connects: its first commit creates the tables and the
            # position row within the next few tenths of a second.
            assert _wait(lambda: _connections(db) > 0, process)
            time.sleep(rng.uniform(0, 0.3))
        else:
            # Between commits, during a load or inside a commit.
            assert _wait(lambda: _position(db, pipeline) > before, process)  # noqa: B023
            time.sleep(rng.uniform(0, 0.1))
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) in (-signal.SIGKILL, 0)  # killed, or done before the kill
        positions.append(_position(db, pipeline))
        if positions[-1] == published[-1]:
            break  # a fast run can finish before its kill: nothing left to cut

    report = run_pipeline(pipeline, drain=True)

    cut = [p for p in positions if p < published[-1]]
    assert len(set(cut)) >= 3, f"kills did not land mid-run: positions {positions}"
    result = check_orders(report.table_uri, published, pipeline.app_id, payloads)
    assert result.ok, str(result)
