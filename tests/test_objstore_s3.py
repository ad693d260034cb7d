"""Delta tables on an S3 API (moto's server, signatures checked), reached through a depot.

The depot's storage options hold ``{PLACEHOLDER}``s filled at run time, as a deployment keeps
its keys out of the file. Every test ends with the checker reading the table from the bucket.
deltalake 1.x commits ``_delta_log/N.json`` with a conditional PUT (``If-None-Match: *``), so
two writers need no lock provider: the second PUT of a version gets 412 and retries.
"""

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from checker import CheckResult, check_exactly_once, check_orders, order_keys
from conftest import S3Server, order, run_cli, start_cli_run
from deltalake import DeltaTable

from nilus_dagster.engine import run_pipeline
from nilus_dagster.errors import PlaceholderError, SinkError
from nilus_dagster.manifest import Pipeline, parse_pipeline

# Values filled or registered here must not mask text in other tests.
pytestmark = pytest.mark.usefixtures("isolated_secrets")

DEPOT = """\
depots:
  lake:
    root: s3://{bucket}/nilus
    storage_options:
      AWS_ENDPOINT_URL: "{{S3_ENDPOINT}}"
      AWS_ALLOW_HTTP: "true"
      AWS_REGION: us-east-1
      AWS_ACCESS_KEY_ID: "{{S3_KEY_ID}}"
      AWS_SECRET_ACCESS_KEY: "{{S3_SECRET}}"
"""
SMALL_COMMITS = "commit_max_rows: 400\ncheckpoint_every: 0\ncompact_every: 0\n"


@pytest.fixture
def s3_depot(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The ``lake`` depot on a fresh bucket; its keys in the environment under other names."""
    path = tmp_path / "depots.yaml"
    path.write_text(DEPOT.format(bucket=s3_bucket))
    monkeypatch.setenv("NILUS_DEPOTS", str(path))
    monkeypatch.setenv("S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("S3_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("S3_SECRET", s3_server.secret_access_key)
    return path


def _objects(s3_server: S3Server, bucket: str) -> list[str]:
    listed = s3_server.client().list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


def _poisoned(start: int, count: int) -> list[bytes | dict[str, object]]:
    return [b"{broken %d" % i if i % 37 == 4 else order(i) for i in range(start, start + count)]


def _check(
    pipeline: Pipeline, published: list[int], payloads: list[object], s3_server: S3Server
) -> CheckResult:
    """The checker, reading the pipeline's table and dead letters from the bucket."""
    result = check_orders(
        pipeline.table_location().uri,
        published,
        pipeline.app_id,
        payloads,
        storage_options=s3_server.storage_options(),
    )
    assert result.ok, str(result)
    return result


def test_append_with_dead_letters_on_s3(
    s3_server, s3_bucket, s3_depot, stream_pipeline, publisher
) -> None:
    subject, pipeline = stream_pipeline(sink_options=SMALL_COMMITS)
    payloads = _poisoned(0, 1_500)
    published = publisher.publish(subject, payloads)

    report = run_pipeline(pipeline, drain=True)

    uri = pipeline.table_location().uri
    assert uri == f"s3://{s3_bucket}/nilus/analytics/orders"
    assert report.dead_letters == sum(isinstance(p, bytes) for p in payloads) > 0
    keys = _objects(s3_server, s3_bucket)
    assert any(k.startswith("nilus/analytics/orders/_delta_log/") for k in keys)
    assert any(k.startswith("nilus/analytics/orders__dead_letters/_delta_log/") for k in keys)
    result = _check(pipeline, published, payloads, s3_server)
    assert result.in_dead_letters == report.dead_letters


def test_merge_on_s3_keeps_the_latest_message_per_key(
    s3_server, s3_depot, stream_pipeline, publisher
) -> None:
    subject, pipeline = stream_pipeline(
        sink_options="incremental_strategy: merge\nprimary_key: order_id\n" + SMALL_COMMITS
    )
    first = [order(i) for i in range(600)]
    published = publisher.publish(subject, first)
    run_pipeline(pipeline, drain=True)
    updates = [{**order(i), "status": "refunded"} for i in range(0, 600, 5)]
    updated = publisher.publish(subject, updates)
    run_pipeline(pipeline, drain=True)
    run_pipeline(pipeline, drain=True)  # nothing new: changes nothing

    # Each key's row is its latest message: the updates replaced the first messages' rows.
    surviving = dict(zip(published, first, strict=True))
    for seq in published[::5]:
        del surviving[seq]
    surviving.update(zip(updated, updates, strict=True))
    result = check_exactly_once(
        pipeline.table_location().uri,
        sorted(surviving),
        pipeline.app_id,
        keys=order_keys(list(surviving), list(surviving.values())),
        key_column="order_id",
        storage_options=s3_server.storage_options(),
    )
    assert result.ok, str(result)
    table = DeltaTable(pipeline.table_location().uri, storage_options=s3_server.storage_options())
    statuses = table.to_pyarrow_table(columns=["status"]).column(0).to_pylist()
    assert statuses.count("refunded") == len(updates)


def test_a_fully_qualified_dest_table_is_written_at_that_location(
    s3_server, s3_bucket, s3_depot, nats_server, publisher, stream_name, write_manifest
) -> None:
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    location = f"s3://{s3_bucket}/raw/eu/orders"
    pipeline = parse_pipeline(
        write_manifest(
            address=f"nats+jetstream://{nats_server.hostport}?subject={subject}",
            stream=stream_name,
            dest_table=location,
        )
    )
    payloads = _poisoned(0, 300)
    published = publisher.publish(subject, payloads)

    run_pipeline(pipeline, drain=True)

    assert pipeline.table_location().uri == location
    keys = _objects(s3_server, s3_bucket)
    assert any(k.startswith("raw/eu/orders/_delta_log/") for k in keys)
    assert any(k.startswith("raw/eu/orders__dead_letters/_delta_log/") for k in keys)
    assert not any(k.startswith("nilus/") for k in keys)
    _check(pipeline, published, payloads, s3_server)


def _wait_for(event: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_mid_run_on_s3_then_the_next_run_completes_exactly_once(
    s3_server, s3_depot, stream_pipeline, publisher
) -> None:
    subject, pipeline = stream_pipeline(query="&batch_size=200", sink_options=SMALL_COMMITS)
    payloads = _poisoned(0, 5_000)
    published = publisher.publish(subject, payloads)
    uri = pipeline.table_location().uri
    options = s3_server.storage_options()

    def position() -> int:
        try:
            return (
                DeltaTable(uri, storage_options=options).transaction_version(pipeline.app_id) or 0
            )
        except Exception:  # not created yet
            return 0

    run = start_cli_run(pipeline.path)
    try:
        assert _wait_for(lambda: position() > 0), "the run committed nothing"
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
    killed_at = position()
    assert 0 < killed_at < published[-1], "the kill came after the run had finished"

    report = run_pipeline(pipeline, drain=True)

    assert report.first_seq == killed_at + 1
    _check(pipeline, published, payloads, s3_server)


def test_two_concurrent_runs_on_s3_write_every_sequence_once(
    s3_server, s3_depot, stream_pipeline, publisher
) -> None:
    subject, pipeline = stream_pipeline(query="&batch_size=200", sink_options=SMALL_COMMITS)
    published: list[int] = []
    payloads: list[bytes | dict[str, object]] = []
    conflicts = 0
    for round_ in range(3):  # until the two runs overlap (a loaded machine may start one late)
        batch = _poisoned(round_ * 4_000, 4_000)
        published += publisher.publish(subject, batch)
        payloads += batch
        runs = [
            start_cli_run(pipeline.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        outputs = [run.communicate(timeout=180) for run in runs]
        for run, (_, err) in zip(runs, outputs, strict=True):
            assert run.returncode == 0, err
        conflicts += sum(err.count("a concurrent commit moved the position") for _, err in outputs)
        if conflicts:
            break

    assert conflicts, "the two runs never overlapped"
    _check(pipeline, published, payloads, s3_server)


def test_storage_option_placeholders_are_filled_at_run_time(
    s3_server, s3_depot, stream_pipeline, publisher, monkeypatch
) -> None:
    monkeypatch.delenv("S3_SECRET")
    subject, pipeline = stream_pipeline()  # loading needs no secret
    payloads = [order(i) for i in range(50)]
    published = publisher.publish(subject, payloads)

    shown = pipeline.table_location(fill_secrets=False)
    assert shown.storage_options["AWS_SECRET_ACCESS_KEY"] == "{S3_SECRET}"
    with pytest.raises(PlaceholderError) as unset:
        run_pipeline(pipeline, drain=True)
    assert "depots.lake.storage_options.AWS_SECRET_ACCESS_KEY" in str(unset.value)
    assert "environment variable S3_SECRET is not set" in str(unset.value)

    monkeypatch.setenv("S3_SECRET", s3_server.secret_access_key)
    run_pipeline(pipeline, drain=True)
    _check(pipeline, published, payloads, s3_server)


@pytest.mark.parametrize(
    ("variable", "option", "code"),
    [
        ("S3_SECRET", "AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"),
        ("S3_KEY_ID", "AWS_ACCESS_KEY_ID", "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_are_a_clear_error_naming_the_variables_and_losing_nothing(
    s3_server, s3_depot, stream_pipeline, publisher, monkeypatch, variable, option, code
) -> None:
    subject, pipeline = stream_pipeline()
    payloads = [order(i) for i in range(40)]
    published = publisher.publish(subject, payloads)
    run_pipeline(pipeline, max_messages=10)
    wrong = f"AKIAWRONG{uuid.uuid4().hex[:11].upper()}"
    monkeypatch.setenv(variable, wrong)

    with pytest.raises(SinkError) as refused:
        run_pipeline(pipeline, drain=True)
    cli = run_cli("run", str(pipeline.path), "--drain", timeout=120)

    message = str(refused.value)
    assert f"the store refused the credentials ({code}" in message
    assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    assert f"{s3_depot}: depots.lake.storage_options" in message
    assert f"{option} from {{{variable}}}" in message
    assert cli.returncode != 0
    assert f"the store refused the credentials ({code}" in cli.stderr + cli.stdout
    for text in (message, cli.stderr, cli.stdout):
        assert wrong not in text
        assert s3_server.secret_access_key not in text

    monkeypatch.setenv("S3_SECRET", s3_server.secret_access_key)
    monkeypatch.setenv("S3_KEY_ID", s3_server.access_key_id)
    run_pipeline(pipeline, drain=True)
    _check(pipeline, published, payloads, s3_server)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            ("root: s3://{bucket}/nilus", "root: s3://no-such-bucket-x/nilus"),
            "the bucket 'no-such-bucket-x' does not exist: create it, or fix the depot's root",
        ),
        (
            ('      AWS_ALLOW_HTTP: "true"\n', ""),
            'the endpoint is plain http: set AWS_ALLOW_HTTP: "true" in the storage options in '
            "{depots}: depots.lake.storage_options",
        ),
    ],
    ids=["missing-bucket", "http-not-allowed"],
)
def test_a_wrong_storage_option_is_a_clear_error(
    s3_depot, s3_bucket, stream_pipeline, publisher, edit, words
) -> None:
    subject, pipeline = stream_pipeline()
    publisher.publish(subject, [order(1)])
    s3_depot.write_text(DEPOT.replace(*edit).format(bucket=s3_bucket))

    with pytest.raises(SinkError) as caught:
        run_pipeline(pipeline, drain=True)

    assert words.format(depots=s3_depot) in str(caught.value)


def test_a_direct_s3_address_takes_its_credentials_from_the_environment(
    s3_server, s3_bucket, nats_server, publisher, stream_name, write_manifest, monkeypatch
) -> None:
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    path = write_manifest(
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}",
        stream=stream_name,
    )
    path.write_text(
        path.read_text().replace("dataos://lake?purpose=rw", f"s3://{s3_bucket}/direct")
    )
    pipeline = parse_pipeline(path)
    payloads = [order(i) for i in range(20)]
    published = publisher.publish(subject, payloads)
    for name, value in s3_server.storage_options(AWS_SECRET_ACCESS_KEY="wrong-secret").items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SinkError) as refused:
        run_pipeline(pipeline, drain=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    run_pipeline(pipeline, drain=True)

    assert "the store refused the credentials (SignatureDoesNotMatch" in str(refused.value)
    assert (
        "check the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_SESSION_TOKEN): the storage options set none"
    ) in str(refused.value)
    assert pipeline.table_location().uri == f"s3://{s3_bucket}/direct/analytics/orders"
    _check(pipeline, published, payloads, s3_server)
