"""``dagster dev`` as a subprocess for end-to-end tests: its instance folder, start, stop, waits."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def write_dagster_home(folder: Path, storage: str = "") -> Path:
    """A DAGSTER_HOME whose run queue is polled every second and whose pools allow one run.

    Args:
        folder: The folder to create.
        storage: Extra ``dagster.yaml`` text (a PostgreSQL ``storage:`` block).
    """
    folder.mkdir()
    (folder / "dagster.yaml").write_text(
        textwrap.dedent(
            """\
            telemetry: {enabled: false}
            run_coordinator:
              module: dagster._core.run_coordinator
              class: QueuedRunCoordinator
              config: {dequeue_interval_seconds: 1}
            concurrency:
              pools: {default_limit: 1}
            """
        )
        + storage
    )
    # Made here, once: `dagster dev` starts its webserver and daemon together, and on a fresh
    # home both create the storage, which can fail ("table alembic_version already exists").
    dg.DagsterInstance.from_config(str(folder)).dispose()
    return folder


@contextlib.contextmanager
def dagster_dev(home: Path, env: dict[str, str], cwd: Path, port: int) -> Iterator[Path]:
    """``dagster dev`` on the repository's workspace.yaml; yields its log file.

    On exit, SIGINT lets it stop its children; then its whole process group is killed.
    """
    log = cwd / "dagster-dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-w",
                str(REPO / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=cwd,
            env={**env, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_for(condition: Callable[[], T], what: str, log: Path, seconds: float) -> T:
    """Poll ``condition`` until it is truthy; fail with the tail of dagster dev's log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; dagster dev output:\n{log.read_text()[-6000:]}")
