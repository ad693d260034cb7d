"""``{NAME}`` placeholders: kept at load time, filled at run time, secrets registered."""

import uuid
from pathlib import Path

import pytest

from nilus_dagster.errors import PlaceholderError
from nilus_dagster.jetstream.connection import server_urls
from nilus_dagster.manifest import Pipeline, parse_pipeline
from nilus_dagster.manifest.placeholders import fill, placeholders_in
from nilus_dagster.redaction import redact

# Values filled or registered here must not mask text in other tests.
pytestmark = pytest.mark.usefixtures("isolated_secrets")

TEMPLATE = """\
name: secretive
spec:
  type: stream
  source:
    address: "{address}"
    options:
      source_table: orders-stream
  sink:
    address: dataos://lake?purpose=rw
    options:
      dest_table: analytics.orders
"""


def pipeline(tmp_path: Path, address: str) -> Pipeline:
    path = tmp_path / "secretive.yaml"
    path.write_text(TEMPLATE.format(address=address))
    return parse_pipeline(path)


def unique(prefix: str) -> str:
    # The redaction registry lives for the whole process: every test uses its own values.
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_placeholders_in() -> None:
    assert placeholders_in("{A}:{B}@{A}") == ["A", "B"]
    assert placeholders_in("{not a name} {1X} {_ok}") == ["_ok"]
    assert placeholders_in(None) == []
    assert placeholders_in("") == []


def test_fill_replaces_every_placeholder() -> None:
    env = {"A": "x", "B": "y"}

    assert fill("{A}-{B}-{A}", env, where="here") == "x-y-x"
    assert fill("no placeholders, {not one}", env, where="here") == "no placeholders, {not one}"


@pytest.mark.parametrize("env", [{}, {"NATS_TOKEN": ""}], ids=["unset", "empty"])
def test_fill_unset_names_the_variable_and_place(env: dict[str, str]) -> None:
    with pytest.raises(PlaceholderError) as caught:
        fill("{NATS_TOKEN}", env, where="orders.yaml: spec.source.address")

    assert str(caught.value) == (
        "orders.yaml: spec.source.address: environment variable NATS_TOKEN is not set: export "
        "NATS_TOKEN, or project it through spec.use.projection (envVars key NATS_TOKEN, "
        "rendered from the NILUS_SECRETS file when run locally)"
    )


def test_parsing_reads_no_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_USERNAME", raising=False)
    monkeypatch.delenv("NATS_PASSWORD", raising=False)

    loaded = pipeline(tmp_path, "nats+jetstream://{NATS_USERNAME}:{NATS_PASSWORD}@h?subject=s")

    address = loaded.manifest.source.address
    assert (address.user, address.password) == ("{NATS_USERNAME}", "{NATS_PASSWORD}")
    assert address.placeholders() == ["NATS_USERNAME", "NATS_PASSWORD"]


def test_unset_variable_at_run_time_names_variable_and_file(tmp_path: Path) -> None:
    loaded = pipeline(tmp_path, "nats+jetstream://{NATS_USERNAME}:{NATS_PASSWORD}@h?subject=s")

    with pytest.raises(PlaceholderError) as caught:
        loaded.resolved_source({"NATS_USERNAME": "bob"})

    message = str(caught.value)
    assert message.startswith(f"{loaded.path}: spec.source.address: ")
    assert "environment variable NATS_PASSWORD is not set: export NATS_PASSWORD" in message


@pytest.mark.parametrize("awkward", ["p@ss", "a:b", "x/y", "what?", "a&b=c", "@:/?&#%+ ="])
def test_values_with_uri_characters_work(tmp_path: Path, awkward: str) -> None:
    password = unique(awkward)
    token = unique("t" + awkward)
    userpass = pipeline(tmp_path, "nats+jetstream://{U}:{P}@{H}:4222?subject=s&durable=d")
    by_token = pipeline(tmp_path, "nats+jetstream://{T}@h?subject=s")

    resolved = userpass.resolved_source({"U": "bob@corp", "P": password, "H": "nats.prod"})
    with_token = by_token.resolved_source({"T": token})

    assert (resolved.user, resolved.password) == ("bob@corp", password)
    assert resolved.servers == ("nats.prod:4222",)
    assert server_urls(resolved) == ["nats://nats.prod:4222"]
    assert (resolved.subject, resolved.durable) == ("s", "d")
    assert with_token.token == token
    assert password not in repr(resolved)
    assert token not in repr(with_token)


def test_resolving_leaves_the_parsed_address_as_written(tmp_path: Path) -> None:
    loaded = pipeline(tmp_path, "nats+jetstream://h?subject=s&nkeys_seed={SEED}")
    seed = unique("SUAXXX")

    resolved = loaded.resolved_source({"SEED": seed})

    assert resolved.nkeys_seed == seed
    assert loaded.manifest.source.address.nkeys_seed == "{SEED}"
    assert loaded.manifest.source.address.redacted() == (
        "nats+jetstream://h?subject=s&nkeys_seed={SEED}"
    )


@pytest.mark.parametrize(
    ("address", "variable"),
    [
        ("nats+jetstream://{U}:{V}@h?subject=s", "V"),
        ("nats+jetstream://h?subject=s&token={V}", "V"),
        ("nats+jetstream://{V}@h?subject=s", "V"),
        ("nats+jetstream://h?subject=s&nkeys_seed={V}", "V"),
    ],
)
def test_filled_secrets_are_registered_for_redaction(
    tmp_path: Path, address: str, variable: str
) -> None:
    secret = unique("s3cr3t")
    loaded = pipeline(tmp_path, address)
    assert redact(f"before: {secret}") == f"before: {secret}"  # not known until filled

    loaded.resolved_source({"U": "bob", variable: secret})

    assert redact(f"connect failed for {secret} on h") == "connect failed for *** on h"


def test_unused_environment_is_not_registered(tmp_path: Path) -> None:
    bystander = unique("bystander")
    loaded = pipeline(tmp_path, "nats+jetstream://h?subject=s&token={T}")

    loaded.resolved_source({"T": unique("tok"), "OTHER": bystander})

    assert redact(bystander) == bystander


def test_run_time_environment_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = unique("from-os-environ")
    monkeypatch.setenv("NATS_TOKEN", token)
    loaded = pipeline(tmp_path, "nats+jetstream://h?subject=s&token={NATS_TOKEN}")

    assert loaded.resolved_source().token == token
