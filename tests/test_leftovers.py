"""A test session stops the nats-servers a killed earlier session left running, and only those."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from leftovers import MARKER, left_behind, stop_left_behind

from nilus_dagster.jetstream.local_server import find_nats_server_binary, free_port


def server(folder: Path, owner: str | None) -> subprocess.Popen[bytes]:
    """A nats-server whose environment names ``owner`` as its test session (or none).

    Started as this test's child, so that the test reaps it: what marks a server as left
    behind is its session's marking, not who its parent is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "server.conf"
    config.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{folder / "js"}" }}\n')
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    if owner is not None:
        env[MARKER] = owner
    process = subprocess.Popen(
        [str(find_nats_server_binary()), "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port)
    return process


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_server_whose_session_is_gone_is_stopped(tmp_path):
    # This PID with another start time: the session that marked it ended (its PID was reused).
    process = server(tmp_path / "left", owner=f"{os.getpid()}:0")
    try:
        assert process.pid in left_behind()
        assert process.pid in stop_left_behind()
        assert process.wait(5) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait(5)


def test_servers_of_a_live_session_and_unmarked_servers_are_left_alone(tmp_path, nats_server):
    live = server(tmp_path / "live", owner=os.environ[MARKER])  # this session's own marking
    unmarked = server(tmp_path / "unmarked", owner=None)  # the machine's, or a user's
    try:
        found = left_behind()
        assert live.pid not in found and unmarked.pid not in found
        assert nats_server.process is not None and nats_server.process.pid not in found
        assert _running(live.pid) and _running(unmarked.pid)
    finally:
        for process in (live, unmarked):
            process.kill()
            process.wait(5)


def test_without_proc_nothing_is_found(tmp_path):
    assert left_behind(tmp_path / "no-proc") == []
    assert stop_left_behind(tmp_path / "no-proc") == []
