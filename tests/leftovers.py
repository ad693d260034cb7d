"""Stopping the nats-servers an earlier test session left behind when it was killed.

Test servers run in sessions of their own (``LocalNatsServer``), so that a Ctrl-C meant for
pytest does not reach them first; a pytest killed outright (``timeout``, SIGKILL) therefore
leaves them running, each holding a port and a store. Every session marks its environment
with its own identity (:func:`mark_session`), which the servers it starts inherit; the next
session stops the servers whose marking session is gone. The machine's own NATS, servers
that users of ``LocalNatsServer`` start, and the servers of a session still running are left
alone.
"""

import os
import signal
from pathlib import Path

MARKER = "NILUS_TEST_SESSION"
"""Environment variable holding ``<pid>:<start time>`` of the test session that set it."""


def _start_time(pid: int, proc: Path) -> str | None:
    try:
        return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def mark_session(proc: Path = Path("/proc")) -> None:
    """Mark this process's environment (and so its children's) as this test session's."""
    os.environ[MARKER] = f"{os.getpid()}:{_start_time(os.getpid(), proc)}"


def left_behind(proc: Path = Path("/proc")) -> list[int]:
    """PIDs of this user's nats-servers whose test session is gone (none without ``/proc``)."""
    if not proc.is_dir():
        return []
    found = []
    prefix = f"{MARKER}=".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            if os.path.basename(argv0) != b"nats-server":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        owner = next((v[len(prefix) :].decode() for v in environ if v.startswith(prefix)), None)
        if owner is None:
            continue
        pid, _, started = owner.partition(":")
        if not pid.isdigit() or _start_time(int(pid), proc) != started:
            found.append(int(entry.name))  # its session ended (or its PID is another's now)
    return found


def stop_left_behind(proc: Path = Path("/proc")) -> list[int]:
    """SIGKILL what :func:`left_behind` finds (its store is a test's, not worth a clean stop)."""
    stopped = []
    for pid in left_behind(proc):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        stopped.append(pid)
    return stopped
