"""A test session stops the nats-servers a killed earlier session left running, and only those."""

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from leftovers import left_behind, stop_left_behind

from nilus_dagster.jetstream.local_server import LocalNatsServer, find_nats_server_binary, free_port


def orphaned_server(folder: Path) -> int:
    """A nats-server started the way a killed session leaves one: its parent gone."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "server.conf"
    config.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{folder / "js"}" }}\n')
    # The shell exits at once, so the server is adopted like a killed pytest's.
    subprocess.run(
        ["sh", "-c", f'"{find_nats_server_binary()}" -c "{config}" >/dev/null 2>&1 &'],
        check=True,
        capture_output=True,
        text=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    pids = [p for p in os.listdir("/proc") if p.isdigit() and _config_of(p) == str(config)]
    assert len(pids) == 1, pids
    pid = int(pids[0])
    if _parent(pid) != 1:
        os.kill(pid, signal.SIGKILL)
        pytest.skip("orphans are adopted by a subreaper here, not PID 1")
    return pid


def _config_of(pid: str) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    return argv[argv.index("-c") + 1] if "-c" in argv[:-1] else None


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_server_left_behind_in_a_test_folder_is_stopped(tmp_path):
    pid = orphaned_server(tmp_path / "nats-store0")  # tmp_path lies in pytest-of-<user>/

    assert pid in left_behind()
    assert pid in stop_left_behind()
    assert _gone(pid)


def test_servers_of_a_live_session_and_servers_configured_elsewhere_are_left_alone(nats_server):
    elsewhere = Path(tempfile.mkdtemp(prefix="not-a-test-"))
    pid = orphaned_server(elsewhere)
    try:
        found = left_behind()
        assert pid not in found  # not in a test's folder
        assert nats_server.process is not None
        assert nats_server.process.pid not in found  # its parent, this session, is alive
        assert _running(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_local_server_killed_with_its_owner_is_found_by_its_default_folder():
    # LocalNatsServer's own temporary store (the demo's) is also a test folder's name.
    server = LocalNatsServer()
    assert server.store_dir.name.startswith("nilus-nats-")
    pid = orphaned_server(server.store_dir)
    try:
        assert pid in left_behind()
    finally:
        stop_left_behind()
        server.stop(remove_store=True)
    assert _gone(pid)
