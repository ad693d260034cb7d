"""The process tree of ``dagster dev``: its CPU and memory by kind of process, and its stop."""

import contextlib
import os
import signal
import subprocess
import threading

import psutil


class TreeCpu:
    """CPU-seconds used by a process and all its descendants, sampled in a thread."""

    def __init__(self, root: int, every: float = 0.2):
        self.root = root
        self.every = every
        self.seen: dict[tuple[int, float], tuple[float, float]] = {}  # (pid, born): first, last
        self.kinds: dict[tuple[int, float], str] = {}
        self.peak_rss = 0
        self.rss_peak: dict[str, int] = {}  # kind: the most its processes held at once
        self.rss_sum: dict[str, int] = {}  # kind: summed over samples (for the mean)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self, baseline: bool = False) -> None:
        by_kind: dict[str, int] = {}
        for proc in self._tree():
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                used = times.user + times.system
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            first, _ = self.seen.get(key, (used if baseline else 0.0, 0.0))
            self.seen[key] = (first, used)
            if key not in self.kinds:
                self.kinds[key] = _kind(proc)
            kind = self.kinds[key]
            by_kind[kind] = by_kind.get(kind, 0) + rss
        self.peak_rss = max(self.peak_rss, sum(by_kind.values()))
        self.samples += 1
        for kind, rss in by_kind.items():
            self.rss_peak[kind] = max(self.rss_peak.get(kind, 0), rss)
            self.rss_sum[kind] = self.rss_sum.get(kind, 0) + rss

    def rss_mb(self, kind: str) -> tuple[int, int]:
        """Peak and mean summed RSS (MB) of the processes of one kind."""
        mean = self.rss_sum.get(kind, 0) / max(1, self.samples)
        return round(self.rss_peak.get(kind, 0) / 2**20), round(mean / 2**20)

    def pids(self, kind: str) -> list[int]:
        """The live processes of one kind."""
        return [p.pid for p in self._tree() if _kind(p) == kind]

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def start(self) -> None:
        self.seen.clear()
        self.rss_peak.clear()
        self.rss_sum.clear()
        self.samples = 0
        self.sample(baseline=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.sample()
        return sum(last - first for first, last in self.seen.values())

    def by_kind(self) -> dict[str, float]:
        """CPU-seconds per kind of process (webserver, daemon, code server, run worker...)."""
        totals: dict[str, float] = {}
        for key, (first, last) in self.seen.items():
            kind = self.kinds.get(key, "other")
            totals[kind] = round(totals.get(kind, 0.0) + last - first, 2)
        return totals


def _kind(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    for needle, kind in (
        ("dagster_webserver", "webserver"),
        ("_daemon run", "daemon"),
        ("api grpc", "code server"),
        ("code-server start", "code server proxy"),
        ("dagster dev", "dagster dev"),
        ("resource_tracker", "code server"),
        ("watch_orphans", "run worker"),
        ("multiprocessing", "run worker"),
        ("execute_run", "run worker"),
    ):
        if needle in cmd:
            return kind
    return cmd[:60]


def stop_dev(dev: subprocess.Popen[bytes]) -> None:
    """Stop ``dagster dev`` and everything it started.

    A service run outlives ``dagster dev`` (its worker is the code server's child, and the
    code server is left behind when ``dagster dev`` exits): the run workers are terminated
    first, like Dagster's terminate (they commit what they pulled and end), and whatever of
    the tree is still alive after ``dagster dev`` exited is killed.
    """
    try:
        tree = psutil.Process(dev.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    workers = [p for p in tree if _kind(p) == "run worker"]
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(workers, timeout=30)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(ProcessLookupError):
        dev.send_signal(signal.SIGINT)
    try:
        dev.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(dev.pid, signal.SIGKILL)
        dev.wait(10)
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.kill()
