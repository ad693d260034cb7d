"""The console script's pyarrow never imports pandas, and pandas still works when asked for."""

import os
import subprocess
import sys
import textwrap

from conftest import run_cli
from deltalake import DeltaTable

# A fresh interpreter each: pyarrow keeps what it found for the life of its process.
CONVERSIONS = """
import sys
import pyarrow as pa
import pyarrow.compute as pc
from nilus_dagster.arrow_start import skip_pandas_probe

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


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_conversions_skip_pandas_and_pandas_works_when_asked_for():
    done = _python(CONVERSIONS)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_after_pandas_was_imported_nothing_changes():
    done = _python(
        """
        import pandas
        from nilus_dagster.arrow_start import skip_pandas_probe
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
