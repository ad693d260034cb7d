"""Every bad PostgreSQL input is a clear error naming the cause and the fix, and loses nothing."""

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from nilus_dagster.engine import run_pipeline
from nilus_dagster.errors import ManifestError, PlaceholderError, SinkError
from nilus_dagster.manifest import parse_pipeline
from nilus_dagster.manifest.depots import resolve_table_location
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink.postgres import PostgresSink

APP = "nilus-dagster/orders"


def _batch(start: int, count: int) -> MessageBatch:
    now = time.time_ns()
    return MessageBatch(
        sequences=list(range(start, start + count)),
        timestamps_ns=[now] * count,
        subjects=["o"] * count,
        payloads=[json.dumps({"id": i}).encode() for i in range(start, start + count)],
    )


def _open(location, **kwargs: object) -> PostgresSink:  # type: ignore[no-untyped-def]
    sink = PostgresSink(location, app_id=APP, **kwargs)  # type: ignore[arg-type]
    sink.open()
    return sink


def _write(sink: PostgresSink, start: int, count: int) -> None:
    decoded = sink.prepare(_batch(start, count))
    sink.commit(decoded.rows, decoded.dead_letters, last_seq=start + count - 1)


def test_unreachable_server(postgres_database) -> None:
    from nilus_dagster.jetstream.local_server import free_port

    location = postgres_database.location(port=str(free_port()))
    with pytest.raises(
        SinkError, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:\d+.*host and port"
    ):
        _open(location)


def test_missing_database_and_unknown_user(postgres_database) -> None:
    with pytest.raises(SinkError, match=r"database 'nope' does not exist.*CREATE DATABASE"):
        _open(postgres_database.location(dbname="nope"))
    with pytest.raises(SinkError, match=r"no user 'ghost'"):
        _open(postgres_database.location(user="ghost"))


def test_wrong_password_names_the_user_and_never_shows_the_password(password_postgres) -> None:
    from nilus_dagster.manifest.depots import TableLocation

    options = {**password_postgres, "password": "wrong-secret-pw"}
    location = TableLocation("postgresql://x?table=a.b", options, kind="postgresql", table="a.b")
    with pytest.raises(SinkError) as raised:
        _open(location)
    assert "refused the password of user 'postgres'" in str(raised.value)
    assert "wrong-secret-pw" not in str(raised.value)
    good = TableLocation(
        "postgresql://x?table=a.b", password_postgres, kind="postgresql", table="a.b"
    )
    sink = _open(good)
    _write(sink, 1, 3)
    assert sink.row_count() == 3


def test_missing_schema_is_created_when_the_user_may_else_a_clear_error(postgres_database) -> None:
    db = postgres_database
    _open(db.location("fresh.orders")).close()
    assert db.query("SELECT 1 FROM pg_namespace WHERE nspname = 'fresh'") == [(1,)]

    role = db.role()  # may connect, may not create schemas
    db.query(f'REVOKE CREATE ON DATABASE "{db.name}" FROM PUBLIC')
    with pytest.raises(
        SinkError, match=r"schema 'other' does not exist.*may not create it.*CREATE SCHEMA"
    ):
        _open(db.location("other.orders", user=role))


@pytest.mark.parametrize(
    ("strategy", "grants", "missing"),
    [
        (
            "append",
            [
                "GRANT USAGE ON SCHEMA analytics TO {role}",
                "GRANT SELECT, INSERT, UPDATE ON analytics.nilus_positions TO {role}",
            ],
            "CREATE on schema 'analytics'",
        ),
        (
            "append",
            ["GRANT USAGE ON SCHEMA analytics TO {role}"],
            "SELECT on table analytics.nilus_positions",
        ),
        (
            "append",
            [
                "GRANT USAGE ON SCHEMA analytics TO {role}",
                "GRANT SELECT, INSERT, UPDATE ON analytics.nilus_positions TO {role}",
            ],
            "INSERT on table analytics.orders",
        ),
        (
            "merge",
            [
                "GRANT USAGE ON SCHEMA analytics TO {role}",
                "GRANT SELECT, INSERT, UPDATE ON analytics.nilus_positions TO {role}",
                "GRANT SELECT, INSERT ON analytics.orders TO {role}",
            ],
            "UPDATE on table analytics.orders",
        ),
        (
            "replace",
            [
                "GRANT USAGE ON SCHEMA analytics TO {role}",
                "GRANT SELECT, INSERT, UPDATE ON analytics.nilus_positions TO {role}",
                "GRANT SELECT, INSERT ON analytics.orders TO {role}",
            ],
            "TRUNCATE on table analytics.orders",
        ),
        ("append", [], "USAGE on schema 'analytics'"),
    ],
)
def test_a_missing_privilege_is_named_with_its_grant(
    postgres_database, strategy, grants, missing
) -> None:
    db = postgres_database
    primary_key = ["id"] if strategy == "merge" else None
    owner = _open(db.location(), strategy=strategy, primary_key=primary_key)
    _write(owner, 1, 2)
    if "CREATE on schema" in missing:
        db.query("DROP TABLE analytics.orders")
    role = db.role(*grants)
    with pytest.raises(SinkError, match=f"lacks {missing}.*GRANT"):
        _open(db.location(user=role), strategy=strategy, primary_key=primary_key)


_WRITER_GRANTS = (
    "GRANT USAGE ON SCHEMA analytics TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON analytics.nilus_positions TO {role}",
)


def test_a_user_who_does_not_own_the_table_merges_through_its_unique_index(
    postgres_database,
) -> None:
    db = postgres_database
    _write(_open(db.location(), strategy="merge", primary_key=["id"]), 1, 3)
    role = db.role(
        *_WRITER_GRANTS, "GRANT SELECT, INSERT, UPDATE, DELETE ON analytics.orders TO {role}"
    )
    sink = _open(db.location(user=role), strategy="merge", primary_key=["id"])
    _write(sink, 2, 3)  # ids 2..4: two updates, one new row
    _write(sink, 5, 1)
    assert db.query("SELECT id, _nats_seq FROM analytics.orders ORDER BY id") == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
        (5, 5),
    ]


def test_a_merge_key_without_a_unique_index_is_named_with_the_owners_statement(
    postgres_database,
) -> None:
    db = postgres_database
    _write(_open(db.location()), 1, 3)  # appended: no unique index on id
    role = db.role(
        *_WRITER_GRANTS, "GRANT SELECT, INSERT, UPDATE, DELETE ON analytics.orders TO {role}"
    )
    with pytest.raises(SinkError) as refused:
        _open(db.location(user=role), strategy="merge", primary_key=["id"])
    message = str(refused.value)
    assert "only its owner 'postgres'" in message
    assert 'CREATE UNIQUE INDEX ON "analytics"."orders" ("id")' in message

    db.query("CREATE UNIQUE INDEX orders_id ON analytics.orders (id)")  # what it says to run
    _write(_open(db.location(user=role), strategy="merge", primary_key=["id"]), 4, 2)
    assert db.query("SELECT count(*), max(id) FROM analytics.orders") == [(5, 5)]


def test_a_window_replacement_without_delete_names_the_privilege(postgres_database) -> None:
    db = postgres_database
    _write(_open(db.location()), 1, 3)
    role = db.role(*_WRITER_GRANTS, "GRANT SELECT, INSERT ON analytics.orders TO {role}")
    sink = _open(db.location(user=role))
    replay = sink.prepare(_batch(1, 3))
    now = time.time()
    window = {
        "start": datetime.fromtimestamp(now - 3600, timezone.utc),
        "end": datetime.fromtimestamp(now + 3600, timezone.utc),
    }
    with pytest.raises(SinkError, match=r"lacks DELETE on table analytics\.orders.*GRANT DELETE"):
        sink.replace_window(replay.rows, None, **window)
    assert db.query("SELECT count(*) FROM analytics.orders") == [(3,)]

    db.query(f'GRANT DELETE ON analytics.orders TO "{role}"')
    sink.replace_window(replay.rows, None, **window)
    assert db.query("SELECT count(*) FROM analytics.orders") == [(3,)]


def test_a_read_only_server(postgres_database) -> None:
    db = postgres_database
    _write(_open(db.location()), 1, 2)
    db.query(f'ALTER DATABASE "{db.name}" SET default_transaction_read_only = on')
    with pytest.raises(SinkError, match=r"read-only.*primary"):
        _open(db.location())


def test_an_existing_table_with_incompatible_columns(postgres_database) -> None:
    db = postgres_database
    db.query("CREATE SCHEMA analytics")
    db.query("CREATE TABLE analytics.orders (id bigint, _nats_seq text)")
    with pytest.raises(
        SinkError, match=r"incompatible columns.*_nats_subject is missing; _nats_seq is text"
    ):
        _open(db.location())


def test_create_table_false_and_no_table(postgres_database) -> None:
    with pytest.raises(SinkError, match="does not exist and create_table is false"):
        _open(postgres_database.location(), create_table=False)


def test_a_failed_commit_loses_nothing_and_the_next_run_writes_it(postgres_database) -> None:
    db = postgres_database
    sink = _open(db.location())
    _write(sink, 1, 5)
    role = db.role(
        "GRANT USAGE ON SCHEMA analytics TO {role}",
        "GRANT SELECT, INSERT, UPDATE ON analytics.nilus_positions TO {role}",
        "GRANT INSERT ON analytics.orders TO {role}",
    )
    restricted = _open(db.location(user=role))
    batch = _batch(6, 3)
    decoded = restricted.prepare(batch)
    # A new field needs ALTER TABLE, which only the table's owner may do.
    extra = decoded.rows.append_column("coupon", __import__("pyarrow").array(["x"] * 3))
    with pytest.raises(SinkError, match="privilege"):
        restricted.commit(extra, decoded.dead_letters, last_seq=8)
    assert db.query("SELECT count(*), max(_nats_seq) FROM analytics.orders") == [(5, 5)]
    assert db.query("SELECT last_seq FROM analytics.nilus_positions") == [(5,)]
    _write(sink, 6, 3)
    assert db.query("SELECT count(*) FROM analytics.orders") == [(8,)]


def _manifest(tmp_path: Path, address: str, dest_table: str = "analytics.orders") -> Path:
    path = tmp_path / "pg.yaml"
    path.write_text(
        "name: orders\nspec:\n  type: stream\n  source:\n"
        "    address: nats+jetstream://127.0.0.1:4222?subject=o.x\n"
        "    options: {source_table: O}\n  sink:\n"
        f'    address: "{address}"\n    options: {{dest_table: {dest_table}}}\n'
    )
    return path


def test_direct_address_placeholders_are_filled_at_run_time_and_redacted(
    tmp_path, isolated_secrets
) -> None:
    path = _manifest(tmp_path, "postgresql://{PG_USER}:{PG_PASSWORD}@db.example:6543/analytics")
    pipeline = parse_pipeline(path)  # nothing read from the environment at load time
    shown = pipeline.table_location(fill_secrets=False)
    assert shown.uri == "postgresql://{PG_USER}@db.example:6543/analytics?table=analytics.orders"
    with pytest.raises(PlaceholderError, match="PG_PASSWORD"):
        pipeline.table_location({"PG_USER": "app"})
    location = pipeline.table_location({"PG_USER": "app", "PG_PASSWORD": "s3cret-pw"})
    assert location.kind == "postgresql" and location.table == "analytics.orders"
    assert location.storage_options["password"] == "s3cret-pw"
    assert "s3cret-pw" not in location.uri
    from nilus_dagster.redaction import redact

    assert "s3cret-pw" not in redact("failed: s3cret-pw")


def test_a_password_written_in_the_address_is_masked_too(tmp_path, isolated_secrets) -> None:
    from nilus_dagster.redaction import redact

    path = _manifest(tmp_path, "postgresql://app:literal-pw-77@db.example:5432/analytics")
    location = parse_pipeline(path).table_location({})
    assert location.storage_options["password"] == "literal-pw-77"
    assert "literal-pw-77" not in repr(location) + location.uri
    assert redact("libpq said: literal-pw-77") == "libpq said: ***"


def test_the_resources_password_stays_out_of_the_deployed_pipelines_repr(
    tmp_path, isolated_secrets
) -> None:
    from nilus_dagster.dagster import PostgresResource, SinkResource
    from nilus_dagster.dagster.resources import engine_call

    pipeline = parse_pipeline(_manifest(tmp_path, "postgresql://app@db.example:5432/analytics"))
    resource = SinkResource(postgres=PostgresResource(password="resource-pw-31"))
    call = engine_call(pipeline, None, resource)
    assert call.pipeline.table_location({}).storage_options["password"] == "resource-pw-31"
    assert "resource-pw-31" not in repr(call)


def test_postgresql_depots(tmp_path, isolated_secrets) -> None:
    depots = tmp_path / "depots.yaml"
    depots.write_text(
        "depots:\n  warehouse:\n    type: postgresql\n"
        '    url: "postgresql://{PG_USER}:{PG_PASSWORD}@pg:5432/analytics"\n'
    )
    path = _manifest(tmp_path, "dataos://warehouse?purpose=rw")
    pipeline = parse_pipeline(path)
    env = {"NILUS_DEPOTS": str(depots), "PG_USER": "app", "PG_PASSWORD": "pw-from-env"}
    location = resolve_table_location(pipeline.manifest.sink, env)
    assert location.kind == "postgresql"
    assert location.storage_options == {
        "host": "pg",
        "port": "5432",
        "dbname": "analytics",
        "user": "app",
        "password": "pw-from-env",
    }
    assert location.options_source == (
        f"{depots}: depots.warehouse.url (for (manifest)) (user from {{PG_USER}}; password "
        "from {PG_PASSWORD})"
    )
    depots.write_text("depots:\n  warehouse:\n    type: postgresql\n    root: x\n")
    with pytest.raises(ManifestError, match=r"depots.warehouse.root.*postgresql depot") as err:
        resolve_table_location(pipeline.manifest.sink, env)
    assert "url: is required" in str(err.value)
    depots.write_text("depots:\n  warehouse:\n    type: oracle\n    url: x\n")
    with pytest.raises(ManifestError, match=r"depots.warehouse.type.*delta, iceberg, postgresql"):
        resolve_table_location(pipeline.manifest.sink, env)


def test_a_run_against_a_stopped_database_fails_before_pulling_and_names_the_address(
    tmp_path, postgres_database, publisher, stream_pipeline, monkeypatch
) -> None:
    from checker import check_exactly_once

    from nilus_dagster.jetstream.local_server import free_port

    db = postgres_database
    stopped = f"postgresql://postgres:{{PG_PASSWORD}}@127.0.0.1:{free_port()}/{db.name}"
    monkeypatch.setenv("PG_PASSWORD", "pw-of-the-test")  # the machine's server trusts anyway
    subject, pipeline = stream_pipeline(sink_address=stopped)
    published = publisher.publish_orders(subject, 10)
    with pytest.raises(SinkError) as refused:
        run_pipeline(pipeline, drain=True)
    message = str(refused.value)
    assert message.startswith(
        f"{pipeline.path}: spec.sink.address (password from {{PG_PASSWORD}}): PostgreSQL sink "
    )
    assert "cannot reach PostgreSQL" in message and "pw-of-the-test" not in message

    text = pipeline.path.read_text()
    pipeline.path.write_text(text.replace(stopped.split("@")[1], f"{db.host}:{db.port}/{db.name}"))
    report = run_pipeline(parse_pipeline(pipeline.path), drain=True)
    result = check_exactly_once(report.table_uri, published, pipeline.app_id)
    assert result.ok, str(result)


def test_a_user_without_connect_on_the_database(postgres_database) -> None:
    db = postgres_database
    role = db.role()
    db.query(f'REVOKE CONNECT ON DATABASE "{db.name}" FROM PUBLIC')
    with pytest.raises(SinkError, match=r"lacks CONNECT on database .*GRANT CONNECT ON DATABASE"):
        _open(db.location(user=role))


def test_partition_by_on_a_postgresql_sink_names_the_manifest(
    postgres_database, stream_pipeline
) -> None:
    _, pipeline = stream_pipeline(
        sink_address=postgres_database.url, sink_options="partition_by: status\n"
    )
    with pytest.raises(SinkError) as refused:
        run_pipeline(pipeline, drain=True)
    assert str(refused.value).startswith(f"{pipeline.path}: partition_by is for lakehouse")
    assert "remove partition_by from spec.sink.options" in str(refused.value)
