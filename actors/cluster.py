"""Cluster mode: a local JetStream cluster of real nats-server processes, and how many replicas
the event stream gets on the server an actor is connected to.

* :class:`LocalCluster` starts ``n`` nats-servers on loopback (each with ``server_name``,
  JetStream and a ``cluster {}`` block routing to the others), waits until every node's
  monitoring endpoint reports JetStream healthy with a meta leader (``/healthz``, ``/jsz``: this
  works whatever accounts and TLS clients need), and can SIGKILL and restart any node on the same
  ports and data. The fault tests, the
  scale benchmark and ``docs/operations-cluster.md`` use it; ``docker/compose.yaml`` runs the same
  topology in containers.
* :func:`stream_replicas` decides the event stream's replica count: the configured number
  (``[storage] replicas``), else 3 when the connected server reports a cluster, else 1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import httpx
from nats.aio.client import Client as NATS

from actors.server import EmbeddedNats, NatsServerError

__all__ = ["CLUSTERED_REPLICAS", "LocalCluster", "free_ports", "is_clustered", "stream_replicas"]

CLUSTERED_REPLICAS = 3
"""The event stream's replicas on a cluster: a quorum of 2 survives the loss of any one node."""


def is_clustered(nc: NATS) -> bool:
    """True when the server ``nc`` is connected to says it belongs to a cluster.

    The server's INFO carries ``cluster`` (the cluster's name) only when routes are configured.
    """
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    return bool(info.get("cluster"))


def stream_replicas(nc: NATS, configured: int | None = None) -> int:
    """The event stream's replica count: ``configured`` if given, else 3 on a cluster, else 1."""
    if configured is not None:
        return configured
    return CLUSTERED_REPLICAS if is_clustered(nc) else 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago (held open together while chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


class LocalCluster:
    """``n`` local nats-servers forming one JetStream cluster on loopback.

    Node ``i`` is named ``n{i+1}``, keeps its data under ``base_dir/n{i+1}`` and keeps its client
    and route ports across restarts, so a client's server list stays valid. ``extra_config`` is
    appended to every node's configuration (accounts, TLS ...).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        n: int = 3,
        *,
        name: str = "vapora",
        host: str = "127.0.0.1",
        sync_interval: str = "1s",
        extra_config: str = "",
        ready_timeout: float = 30.0,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.base_dir = Path(base_dir)
        self.name = name
        self.host = host
        self.ready_timeout = ready_timeout
        ports = free_ports(3 * n, host)
        self.client_ports, self.route_ports = ports[:n], ports[n : 2 * n]
        self.monitor_ports = ports[2 * n :]
        self.nodes = [
            EmbeddedNats(
                self.base_dir / self.node_name(i),
                port=self.client_ports[i],
                host=host,
                sync_interval=sync_interval,
                extra_config=self._node_config(i) + extra_config,
            )
            for i in range(n)
        ]

    @staticmethod
    def node_name(i: int) -> str:
        return f"n{i + 1}"

    def _node_config(self, i: int) -> str:
        routes = ", ".join(
            f'"nats-route://{self.host}:{port}"'
            for j, port in enumerate(self.route_ports)
            if j != i
        )
        return (
            f'server_name: "{self.node_name(i)}"\n'
            f'http: "{self.host}:{self.monitor_ports[i]}"\n'
            f"cluster {{\n"
            f'  name: "{self.name}"\n'
            f'  listen: "{self.host}:{self.route_ports[i]}"\n'
            f"  routes: [{routes}]\n"
            f"}}\n"
        )

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, alive or not (what an actor's server list holds)."""
        return [f"nats://{self.host}:{port}" for port in self.client_ports]

    @property
    def url(self) -> str:
        """The comma-separated server list (the form ``--nats-url`` takes)."""
        return ",".join(self.urls)

    def index_of(self, server_name: str) -> int:
        """The index of the node called ``server_name`` (e.g. a stream's leader)."""
        for i in range(len(self.nodes)):
            if self.node_name(i) == server_name:
                return i
        raise KeyError(server_name)

    async def start(self) -> LocalCluster:
        """Start every node (concurrently: each waits for its routes) and wait for JetStream."""
        async with anyio.create_task_group() as tg:
            for node in self.nodes:
                tg.start_soon(node.start)
        await self.wait_ready()
        return self

    async def wait_ready(self, nodes: Sequence[int] | None = None) -> None:
        """Wait until each node in ``nodes`` (default: every live one) reports JetStream healthy
        on its monitoring endpoint, which needs an elected meta leader."""
        indexes = [i for i in (nodes or range(len(self.nodes))) if self.nodes[i].alive()]
        deadline = time.monotonic() + self.ready_timeout
        async with httpx.AsyncClient(timeout=1.0) as http:
            for i in indexes:
                await self._wait_healthy(http, i, deadline)

    async def _wait_healthy(self, http: httpx.AsyncClient, i: int, deadline: float) -> None:
        base = f"http://{self.host}:{self.monitor_ports[i]}"
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                health = await http.get(f"{base}/healthz")
                meta = (await http.get(f"{base}/jsz")).json().get("meta_cluster") or {}
                if health.status_code == 200 and meta.get("leader"):
                    return
                last = (
                    f"{health.status_code} {health.text.strip()}; meta leader {meta.get('leader')}"
                )
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            await anyio.sleep(0.1)
        raise NatsServerError(
            f"node {self.node_name(i)} not healthy in {self.ready_timeout} s: {last}"
        )

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``: no clean shutdown, no flush."""
        self.nodes[i].kill()

    async def restart(self, i: int) -> None:
        """Start node ``i`` again on its ports and data; return once it serves JetStream."""
        self.nodes[i].kill()
        await self.nodes[i].start()
        await self.wait_ready([i])

    async def stop(self) -> None:
        async with anyio.create_task_group() as tg:
            for node in self.nodes:
                tg.start_soon(node.stop)

    async def __aenter__(self) -> LocalCluster:
        try:
            return await self.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.stop()
