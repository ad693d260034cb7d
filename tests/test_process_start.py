"""The console script's start: the engine imported without the collector and then frozen, pyarrow
that never imports pandas (pandas still works when asked for), numpy without BLAS threads, and
the environment left as it was."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import run_cli
from deltalake import DeltaTable

# A fresh interpreter each: pyarrow keeps what it found for the life of its process.
CONVERSIONS = """
import sys
import pyarrow as pa
import pyarrow.compute as pc
from nilus_dagster.process_start import skip_pandas_probe

assert skip_pandas_probe()
pa.array([1, None]), pa.array(["a", None], pa.string()), pa.scalar(1.5)
pa.record_batch([[1], ["x"]], names=["a", "b"])
pc.if_else(pa.array([True, False]), pa.scalar("x"), "y")
assert "pandas" not in sys.modules, "pyarrow imported pandas"

import pandas as pd

frame = pd.DataFrame({"a": [1, 2]})
assert pa.table(frame).num_rows == 2
assert pa.Table.from_pandas(frame).num_rows == 2
assert pa.array(pd.Series([1, 2])).type == pa.int64()
assert list(pa.table({"a": [3]}).to_pandas()["a"]) == [3]
print("ok")
"""


# What else caps OpenBLAS's threads: left out, so that only the test decides.
_BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in _BLAS_VARIABLES}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **env},
    )


# Threads of this process once numpy is imported, the variable afterwards, and the BLAS.
NUMPY_THREADS = """
import contextlib, os
from nilus_dagster.process_start import one_blas_thread

with one_blas_thread() if os.environ.get("QUIET") else contextlib.nullcontext():
    import numpy
config = getattr(numpy.__config__, "CONFIG", {})  # numpy 1.25 and later
blas = config.get("Build Dependencies", {}).get("blas", {}).get("name", "unknown")
print(len(os.listdir("/proc/self/task")), os.environ.get("OPENBLAS_NUM_THREADS"), blas)
"""


def test_conversions_skip_pandas_and_pandas_works_when_asked_for():
    done = _python(CONVERSIONS)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_numpy_starts_no_blas_threads_and_the_environment_is_left_as_it_was():
    quiet = _python(NUMPY_THREADS, QUIET="1")
    plain = _python(NUMPY_THREADS)
    users = _python(NUMPY_THREADS, QUIET="1", OPENBLAS_NUM_THREADS="2")

    assert quiet.returncode == plain.returncode == users.returncode == 0, quiet.stderr
    assert quiet.stdout.split()[:2] == ["1", "None"]
    blas = plain.stdout.split()[2]
    if "openblas" in blas and len(os.sched_getaffinity(0)) > 1:
        # The control: OpenBLAS starts a thread per further core it may run on.
        assert int(plain.stdout.split()[0]) > 1
    assert users.stdout.split()[1] == "2"  # a value the user set stays theirs


# Collections during the engine's import, with and without start_engine_process.
ENGINE_IMPORT = """
import gc, os, sys
from nilus_dagster.process_start import start_engine_process

before = [s["collections"] for s in gc.get_stats()]
if os.environ.get("START"):
    start_engine_process()
else:
    import nilus_dagster.engine
after = [s["collections"] for s in gc.get_stats()]
print(sum(after) - sum(before), gc.isenabled(), gc.get_freeze_count() > 10_000,
      "pandas" in sys.modules, os.environ.get("OPENBLAS_NUM_THREADS"))
"""


def test_the_engine_is_imported_without_collections_and_frozen():
    started = _python(ENGINE_IMPORT, START="1")
    plain = _python(ENGINE_IMPORT)

    assert started.returncode == plain.returncode == 0, started.stderr
    collections, *rest = started.stdout.split()
    assert int(collections) == 0
    assert rest == ["True", "True", "False", "None"]  # collecting again, frozen, no pandas
    assert int(plain.stdout.split()[0]) > 10  # the collector's work that the start avoids


def test_after_pandas_was_imported_nothing_changes():
    done = _python(
        """
        import pandas
        from nilus_dagster.process_start import skip_pandas_probe
        print(skip_pandas_probe())
        """
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_run_of_the_console_script_never_imports_pandas(
    nats_server, publisher, stream_name, write_manifest
):
    subject = f"{stream_name}.orders"
    publisher.create_stream(stream_name, [subject])
    seqs = publisher.publish_orders(subject, 300)
    path = write_manifest(
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}", stream=stream_name
    )

    ran = run_cli("run", str(path), env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})

    assert ran.returncode == 0, ran.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in ran.stderr.splitlines()]
    assert "pyarrow" in imported
    assert not [name for name in imported if name.startswith("pandas.")]
    uri = next(line.split()[-1] for line in ran.stdout.splitlines() if "table_uri" in line)
    assert DeltaTable(uri).to_pyarrow_table().column("_nats_seq").to_pylist() == seqs
