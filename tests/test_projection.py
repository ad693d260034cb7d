"""``spec.use.projection``: envVars rendered from the NILUS_SECRETS file; the environment wins."""

import base64
import uuid
from pathlib import Path

import pytest

from nilus_dagster.errors import PlaceholderError
from nilus_dagster.manifest import Pipeline, parse_pipeline
from nilus_dagster.redaction import redact

# Values filled or registered here must not mask text in other tests.
pytestmark = pytest.mark.usefixtures("isolated_secrets")

REPO = Path(__file__).resolve().parent.parent

MANIFEST = """\
name: projected
spec:
  type: stream
  use:
    projection:
      secrets:
        - id: engineering:natssecret
          contextAlias: natssecret
      projections:
        envVars:
          - key: NATS_USERNAME
            template: "{{ secrets['natssecret'].username }}"
          - key: NATS_PASSWORD
            template: "{{ secrets['natssecret'].password | base64_decode }}"
          - key: NATS_CLUSTER
            value: nats.prod
  source:
    address: nats+jetstream://{NATS_USERNAME}:{NATS_PASSWORD}@{NATS_CLUSTER}:4222?subject=s
    options:
      source_table: orders-stream
  sink:
    address: dataos://lake?purpose=rw
    options:
      dest_table: analytics.orders
"""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def projected(tmp_path: Path) -> Pipeline:
    path = tmp_path / "projected.yaml"
    path.write_text(MANIFEST)
    return parse_pipeline(path)


def secrets_file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "secrets.yaml"
    path.write_text(text)
    return {"NILUS_SECRETS": str(path)}


def test_templates_render_from_the_secrets_file(projected: Pipeline, tmp_path: Path) -> None:
    password = f"pw:@/{uuid.uuid4().hex}"
    env = secrets_file(tmp_path, f"natssecret:\n  username: nilus\n  password: {b64(password)}\n")

    environment = projected.environment(env)
    resolved = projected.resolved_source(env)

    assert environment["NATS_USERNAME"] == "nilus"
    assert environment["NATS_PASSWORD"] == password
    assert environment["NATS_CLUSTER"] == "nats.prod"
    assert (resolved.user, resolved.password) == ("nilus", password)
    assert resolved.servers == ("nats.prod:4222",)
    assert redact(f"auth failed with {password}") == "auth failed with ***"


def test_secrets_file_keyed_by_secret_id(projected: Pipeline, tmp_path: Path) -> None:
    env = secrets_file(
        tmp_path, f'"engineering:natssecret":\n  username: byid\n  password: {b64("pw-by-id")}\n'
    )

    assert projected.resolved_source(env).user == "byid"


def test_environment_wins_over_the_projection(projected: Pipeline, tmp_path: Path) -> None:
    env = secrets_file(tmp_path, f"natssecret:\n  username: nilus\n  password: {b64('file')}\n")
    env |= {"NATS_PASSWORD": "from-env", "NATS_CLUSTER": "local"}

    resolved = projected.resolved_source(env)

    assert resolved.password == "from-env"
    assert resolved.user == "nilus"
    assert resolved.servers == ("local:4222",)


def test_environment_alone_needs_no_secrets_file(projected: Pipeline) -> None:
    env = {"NATS_USERNAME": "u", "NATS_PASSWORD": "p-env-only"}

    assert projected.resolved_source(env).password == "p-env-only"


def test_missing_alias_is_a_clear_error(projected: Pipeline, tmp_path: Path) -> None:
    env = secrets_file(tmp_path, "othersecret:\n  username: x\n  password: eA==\n")

    with pytest.raises(PlaceholderError) as caught:
        projected.resolved_source(env)

    message = str(caught.value)
    assert message.startswith(f"{projected.path}: spec.use.projection: envVars NATS_USERNAME: ")
    assert "cannot render its template \"{{ secrets['natssecret'].username }}\"" in message
    assert f"from the secrets file {env['NILUS_SECRETS']} (NILUS_SECRETS)" in message
    assert "UndefinedError: 'dict object' has no attribute 'natssecret'" in message
    assert message.endswith(
        "the file has secrets: othersecret; check the secret alias and field names"
    )


def test_bad_base64_is_a_clear_error(projected: Pipeline, tmp_path: Path) -> None:
    env = secrets_file(tmp_path, "natssecret:\n  username: x\n  password: not*base64\n")

    with pytest.raises(PlaceholderError, match="envVars NATS_PASSWORD: cannot render its template"):
        projected.resolved_source(env)


def test_no_secrets_file_leaves_the_variable_unset(projected: Pipeline) -> None:
    with pytest.raises(PlaceholderError) as caught:
        projected.resolved_source({})

    assert "environment variable NATS_USERNAME is not set" in str(caught.value)
    assert "NILUS_SECRETS" in str(caught.value)


def test_malformed_secrets_file_does_not_quote_its_content(
    projected: Pipeline, tmp_path: Path
) -> None:
    env = secrets_file(tmp_path, "natssecret:\n  password: hunter2-in-file\n   bad: [\n")

    with pytest.raises(PlaceholderError) as caught:
        projected.resolved_source(env)

    assert str(caught.value).startswith(f"{env['NILUS_SECRETS']}: line 3, column 7: is not valid")
    assert "hunter2-in-file" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the secrets file"),
        ("- a\n- b\n", "the secrets file must map secret aliases to fields"),
    ],
)
def test_unusable_secrets_file(
    projected: Pipeline, tmp_path: Path, content: str | None, message: str
) -> None:
    env = (
        {"NILUS_SECRETS": str(tmp_path / "missing.yaml")}
        if content is None
        else secrets_file(tmp_path, content)
    )

    with pytest.raises(PlaceholderError, match=message):
        projected.resolved_source(env)


def test_shipped_userpass_pipeline_with_a_secrets_file(tmp_path: Path) -> None:
    shipped = parse_pipeline(REPO / "pipelines" / "orders-userpass.yaml")
    env = secrets_file(tmp_path, f"natssecret:\n  username: nilus\n  password: {b64('pw-x1')}\n")

    resolved = shipped.resolved_source(env)

    assert (resolved.user, resolved.password, resolved.durable) == (
        "nilus",
        "pw-x1",
        "nilus-orders",
    )
