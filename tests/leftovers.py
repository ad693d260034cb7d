"""Stopping the nats-servers an earlier test session left behind when it was killed.

Test servers run in sessions of their own (``LocalNatsServer``), so that a Ctrl-C meant for
pytest does not reach them first; a pytest killed outright (``timeout``, SIGKILL) therefore
leaves them running, each holding a port and a store. The next session stops those: servers
whose parent is gone (adopted by PID 1) and whose configuration file lies in a folder the
tests or ``LocalNatsServer`` make. The machine's own NATS (its configuration is not in such a
folder) and the servers of a session still running (their parent is alive) are left alone.
"""

import os
import signal
import tempfile
from pathlib import Path

_TEST_FOLDERS = ("pytest-of-", "nilus-nats-")


def left_behind(temp_root: str | None = None) -> list[int]:
    """PIDs of this user's orphaned nats-servers configured from a test's temporary folder."""
    root = os.path.realpath(temp_root or tempfile.gettempdir()) + os.sep
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if parent != 1 or not argv or os.path.basename(argv[0]) != "nats-server":
            continue
        config = argv[argv.index("-c") + 1] if "-c" in argv[:-1] else ""
        if not config.startswith(root):
            continue
        if any(part.startswith(_TEST_FOLDERS) for part in config[len(root) :].split(os.sep)):
            found.append(int(entry.name))
    return found


def stop_left_behind(temp_root: str | None = None) -> list[int]:
    """SIGKILL what :func:`left_behind` finds (its store is a test's, not worth a clean stop)."""
    stopped = []
    for pid in left_behind(temp_root):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        stopped.append(pid)
    return stopped
