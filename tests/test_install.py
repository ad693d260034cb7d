"""The installed Dagster and nats-py are inside the ranges the package declares, and the
compiled parts were built where they are required.

`.ci/run` runs the Dagster tests a second time in a venv with the oldest supported releases and
sets NILUS_EXPECT_DAGSTER / NILUS_EXPECT_NATS_PY there, so this also proves which end ran.
"""

import os
from importlib.metadata import requires, version

import pytest
from packaging.requirements import Requirement

from nilus_dagster.jetstream import bulk
from nilus_dagster.sink import lines


def _declared(name: str) -> Requirement:
    for text in requires("nilus-dagster") or []:
        requirement = Requirement(text)
        if requirement.name == name and requirement.marker is None:
            return requirement
    raise AssertionError(f"nilus-dagster declares no {name} dependency")


@pytest.mark.parametrize(
    ("package", "expected_env"),
    [("dagster", "NILUS_EXPECT_DAGSTER"), ("nats-py", "NILUS_EXPECT_NATS_PY")],
)
def test_installed_version_is_in_the_declared_range(package, expected_env):
    installed = version(package)
    declared = _declared(package)

    assert declared.specifier, f"{package} must be a range, not unpinned"
    assert not any(spec.operator == "==" for spec in declared.specifier), "no exact pins"
    assert declared.specifier.contains(installed), (package, installed, str(declared.specifier))
    expected = os.environ.get(expected_env)
    if expected:
        assert installed == expected


def test_the_webserver_is_an_extra_not_a_dependency():
    runtime = [Requirement(t) for t in requires("nilus-dagster") or []]
    assert all(r.marker is not None for r in runtime if r.name == "dagster-webserver")


@pytest.mark.parametrize(
    ("module", "compiled_name", "chosen"),
    [(bulk, "read_bulk_compiled", "read_bulk"), (lines, "join_lines_compiled", "join_lines")],
    ids=["frames", "lines"],
)
def test_the_compiled_parts_are_built_and_used_where_they_are_required(
    module, compiled_name, chosen
):
    # .ci/run requires them, so that the suite never passes on the fallbacks alone by accident.
    if not module.COMPILED and not os.environ.get("NILUS_REQUIRE_COMPILED"):
        pytest.skip(f"{module.__name__} was not compiled and NILUS_REQUIRE_COMPILED is not set")
    assert module.COMPILED
    assert getattr(module, chosen) is getattr(module, compiled_name)
