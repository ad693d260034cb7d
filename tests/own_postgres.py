"""A throwaway PostgreSQL server of a test session's own, for faults that stop the server.

Made with the machine's PostgreSQL binaries (Debian's ``/usr/lib/postgresql/<version>/bin``:
``initdb``, ``pg_ctl``) in a temporary folder, on a free port, trust auth; the shared server on
5432 is never stopped. PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` system user.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nilus_dagster.jetstream.local_server import free_port


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` folder holding ``initdb`` and ``pg_ctl``."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


class OwnPostgres:
    """A PostgreSQL cluster in a temporary folder, started and restarted at will.

    Args:
        bin_dir: Where ``initdb`` and ``pg_ctl`` are.
    """

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="nilus-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:<port>/<database>``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout, cwd=self.root)

    def init(self) -> "OwnPostgres":
        """Create the cluster (no fsync while creating it: it is thrown away)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        return self

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # fsync off: only the server's processes are stopped here, never the machine, so
        # what was committed stays in the OS's page cache and WAL replay finds it.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{self.root}'"
            " -c fsync=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends every session (their transactions roll back),
        ``immediate`` kills the processes (a crash; the next start replays the WAL)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs and remove its folder."""
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
