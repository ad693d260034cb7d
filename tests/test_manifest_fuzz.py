"""Fuzzing: whatever the text, loading ends in a pipeline or in clean problems, never a crash."""

import copy
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nilus_dagster.errors import ManifestError, NilusError, PlaceholderError
from nilus_dagster.manifest import collect_pipelines, parse_nats_address, parse_pipeline
from nilus_dagster.manifest.address import NATS_OPTIONS, AddressError

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Values filled or registered here must not mask text in other tests.
pytestmark = pytest.mark.usefixtures("isolated_secrets")

YAML_TOKENS = [
    "name: ",
    "orders",
    "spec:",
    "\n",
    "  ",
    "    ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ": ",
    ",",
    "'",
    '"',
    "&a ",
    "*a",
    "!!binary ",
    "!!int ",
    "!!float ",
    "!!timestamp ",
    "!!python/name:x ",
    "2001-02-30",
    "2025-01-01",
    "? ",
    "|\n",
    ">\n",
    "# c",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "type: ",
    "stream",
    "batch",
    "source:",
    "sink:",
    "address: ",
    "options:",
    "source_table: ",
    "dest_table: ",
    "a.b",
    "incremental_strategy: ",
    "merge",
    "primary_key: ",
    "run_in_loop: ",
    "true",
    "null",
    "~",
    "0x1F",
    "1e400",
    ".nan",
    "-1",
    "0",
    "depots:",
    "root: ",
    "s3://b",
    "storage_options:",
    "nats+jetstream://",
    "dataos://lake?purpose=rw",
    "{A}",
    "\t",
    "\x00",
    "\ufeff",
    "é",
    "use:",
    "projection:",
    "envVars:",
    "key: ",
    "template: ",
    "{{ x }}",
]
yaml_ish = st.one_of(
    st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join),
    st.text(alphabet=st.sampled_from(list("ab:-[]{}\n &*!?|>'\"#%,.\t@/=")), max_size=120),
    st.text(max_size=80),
)

ADDRESS_TOKENS = [
    "nats+jetstream://",
    "nats://",
    "NATS+JETSTREAM://",
    "",
    "{U}",
    "{P}",
    "{T}",
    "bob",
    ":",
    "@",
    "/",
    "?",
    "&",
    "=",
    "#",
    "%",
    "%40",
    "%zz",
    "+",
    "[",
    "]",
    "::1",
    ",",
    "localhost",
    "nats.prod",
    "4222",
    "0",
    "65536",
    "-1",
    "1.5",
    "nan",
    "1e400",
    " ",
    "\n",
    "*",
    ">",
    ".",
    "..",
    "true",
    "2025-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9" * 30,
    "é",
    *NATS_OPTIONS,
    *(f"{k}=" for k in NATS_OPTIONS),
    "subject=orders.created",
    "subject=",
]
addresses = st.one_of(
    st.lists(st.sampled_from(ADDRESS_TOKENS), max_size=25).map("".join),
    st.builds(
        lambda auth, host, query: f"nats+jetstream://{auth}{host}?subject=orders.created{query}",
        st.sampled_from(["", "{U}:{P}@", "{T}@", "bob:pw@", "@", ":x@"]),
        st.lists(st.sampled_from(ADDRESS_TOKENS), max_size=4).map("".join),
        st.lists(
            st.tuples(st.sampled_from([*NATS_OPTIONS, "x"]), st.sampled_from(ADDRESS_TOKENS)),
            max_size=5,
        ).map(lambda pairs: "".join(f"&{k}={v}" for k, v in pairs)),
    ),
    st.text(max_size=60),
)

GOOD: dict[str, Any] = {
    "name": "orders",
    "spec": {
        "type": "stream",
        "source": {
            "address": "nats+jetstream://{U}:{P}@localhost:4222?subject=orders.created",
            "options": {"source_table": "orders-stream"},
        },
        "sink": {
            "address": "dataos://lake?purpose=rw",
            "options": {"dest_table": "analytics.orders", "incremental_strategy": "append"},
        },
    },
}
PATHS = [
    ("name",),
    ("version",),
    ("tags",),
    ("spec",),
    ("spec", "type"),
    ("spec", "use"),
    ("spec", "dagster"),
    ("spec", "source"),
    ("spec", "source", "address"),
    ("spec", "source", "options"),
    ("spec", "source", "options", "source_table"),
    ("spec", "source", "options", "run_in_loop"),
    ("spec", "sink", "address"),
    ("spec", "sink", "options", "dest_table"),
    ("spec", "sink", "options", "primary_key"),
    ("spec", "sink", "options", "incremental_strategy"),
    ("spec", "sink", "options", "create_table"),
    ("spec", "sink", "options", "commit_max_rows"),
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.dates(),
    st.sampled_from(["merge", "stream", "a.b", "dataos://x", "{A}", "-", "".join(["x"] * 70)]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)


def _check_loaded(text: str, folder: Path) -> None:
    file = folder / "fuzz.yaml"
    try:
        pipeline = parse_pipeline(file, text)
    except ManifestError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file == str(file)
            assert problem.field and problem.message
            assert "\n" not in str(problem)
    else:
        pipeline.manifest.source.address.redacted()
        pipeline.manifest.source.address.placeholders()
        pipeline.table_location(fill_secrets=False)
    # The same text through the folder loader (which also checks depots-only files).
    file.write_text(text, encoding="utf-8", errors="surrogatepass")
    pipelines, problems = collect_pipelines([folder])
    assert len(pipelines) + len(problems) >= 1 or "depots" in text


@FUZZ
@given(text=yaml_ish)
def test_random_yaml_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        _check_loaded(text, Path(folder))


@FUZZ
@given(path=st.sampled_from(PATHS), value=values)
def test_random_values_in_a_valid_manifest(path: tuple[str, ...], value: object) -> None:
    data = copy.deepcopy(GOOD)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    text = yaml.safe_dump(data, allow_unicode=True)
    with tempfile.TemporaryDirectory() as folder:
        _check_loaded(text, Path(folder))


@FUZZ
@given(raw=addresses, fill=st.text(max_size=12))
def test_random_addresses(raw: str, fill: str) -> None:
    try:
        address = parse_nats_address(raw)
    except AddressError as exc:
        assert exc.part and str(exc)
    else:
        assert address.subject
        assert address.batch_size > 0 and address.timeout > 0
        address.redacted()
        env = {name: fill for name in address.placeholders()}
        try:
            resolved = address.resolve(env)
        except PlaceholderError:
            assert fill == ""
        else:
            assert resolved.placeholders() == [] or "{" in fill
            # The repr does not depend on the secrets at all.
            blank = replace(resolved, password=None, token=None, nkeys_seed=None)
            assert repr(resolved) == repr(blank)
    # The same address inside a manifest: only ManifestError may escape.
    data = copy.deepcopy(GOOD)
    data["spec"]["source"]["address"] = raw
    try:
        parse_pipeline("fuzz.yaml", yaml.safe_dump(data, allow_unicode=True))
    except ManifestError:
        pass
    except NilusError as exc:  # pragma: no cover - a wrong error type is a failure too
        raise AssertionError(f"unexpected {type(exc).__name__}: {exc}") from exc
