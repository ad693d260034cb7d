"""Run one benchmark path as a child process: wall time, output, and peak memory.

Peak memory is measured per path (a fresh process each time, so peaks never mix), two ways,
both from ``/proc`` polled every few milliseconds: the largest ``VmHWM`` (the kernel's own
high-water mark of resident memory since ``exec``) of any process in the child's tree, and the
largest sum of current RSS over the whole tree (what a multi-process run such as Dagster's
holds at once). ``ru_maxrss`` from ``wait4``/``RUSAGE_CHILDREN`` is not used: Linux folds the
forking parent's RSS at ``exec`` time into it, so a large orchestrator would inflate every child.
"""

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ProcessResult:
    returncode: int
    wall_seconds: float
    stdout: str
    stderr: str
    max_rss_bytes: int
    tree_rss_bytes: int
    timed_out: bool = False


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        found.extend(int(c) for c in text.split())
    return found


def _memory(pid: int) -> tuple[int, int]:
    """(current RSS, high-water RSS) of ``pid`` in bytes; zeros once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
    except (OSError, IndexError, ValueError):
        pass
    return rss, hwm


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of current RSS, largest high-water RSS) over ``pid`` and its descendants."""
    total = peak = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        rss, hwm = _memory(current)
        total += rss
        peak = max(peak, hwm)
        todo.extend(_children(current))
    return total, peak


def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 900.0,
    poll_seconds: float = 0.02,
) -> ProcessResult:
    """Run ``argv`` to completion and measure it (stdout and stderr are captured)."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [
        threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
        threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),  # type: ignore[union-attr]
    ]
    for reader in readers:
        reader.start()
    peak_tree = peak_one = 0
    timed_out = False
    while True:
        # Sample before reaping: a zombie's /proc entry no longer has its memory.
        tree, one = tree_memory(proc.pid)
        peak_tree, peak_one = max(peak_tree, tree), max(peak_one, one)
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - began > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, _ = os.wait4(proc.pid, 0)
            break
        time.sleep(poll_seconds)
    wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    for reader in readers:
        reader.join(10)
    return ProcessResult(
        returncode=proc.returncode,
        wall_seconds=wall,
        stdout=b"".join(out).decode(errors="replace"),
        stderr=b"".join(err).decode(errors="replace"),
        max_rss_bytes=peak_one,
        tree_rss_bytes=max(peak_tree, peak_one),
        timed_out=timed_out,
    )
