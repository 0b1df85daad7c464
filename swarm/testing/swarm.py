"""An in-process swarm on loopback, for tests and benchmarks.

    async with open_local_swarm(path, [LayerRange(0, 4), LayerRange(4, 8)]) as local:
        local.dht_address            # "127.0.0.1:port", give it to a client
        await local.add_server(LayerRange(0, 8))
        local.kill(0)                # crash a server: no draining, records stay until TTL

Every server is a real `Server` with its own DHT node, RPC listener on port 0 and compute
queue; all run in the caller's trio loop (and share one DHT thread). With a `LinkEmulator`
each server dials through ``links.transport(name)``, the name being ``server<i>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from swarm.client.config import ClientConfig, PingConfig
from swarm.dht import DHTConfig, DHTNode
from swarm.identity import Identity
from swarm.net.methods import HandlerRegistry
from swarm.net.transport import Transport
from swarm.server.config import ServerConfig
from swarm.server.handlers import ServingHandlers
from swarm.server.server import Server, ServerReady
from swarm.testing.links import LinkEmulator
from swarm.types import LayerRange

__all__ = ["LocalServer", "LocalSwarm", "open_local_swarm"]


@dataclass
class LocalServer:
    name: str
    server: Server
    ready: ServerReady
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def address(self) -> str:
        return f"{self.ready.host}:{self.ready.port}"


class LocalSwarm:
    """A bootstrap DHT node and servers, all in this trio loop. Use `open_local_swarm`."""

    def __init__(
        self,
        model: Path,
        nursery: trio.Nursery,
        dht: DHTNode,
        base: ServerConfig,
        links: LinkEmulator | None,
    ) -> None:
        self.model = model
        self._nursery = nursery
        self.dht = dht
        self.base = base
        self.links = links
        self.servers: list[LocalServer] = []

    @property
    def dht_address(self) -> str:
        return self.dht.address

    def client_config(self, **changes: Any) -> ClientConfig:
        """A client of this swarm: its DHT address as the initial peer, and a ping schedule
        that dials every server at once (they all share one host, 127.0.0.1, where a real
        client dials ``pings.new_per_host`` never-reached servers per host and refresh, and
        an unpinged server would lose routes to a pinged one by the luck of the order)."""
        pings = PingConfig(new_per_host=1 + len(self.servers))
        return ClientConfig(initial_peers=(self.dht_address,), pings=pings, **changes)

    async def add_server(
        self,
        layers: LayerRange | None,
        *,
        wrap_handlers: Callable[[ServingHandlers], HandlerRegistry] | None = None,
        transport: Transport | None = None,
        **overrides: object,
    ) -> LocalServer:
        """Start one more server and wait until it is online (deadline 60 s). ``transport``
        (e.g. `swarm.testing.reach.Undialable`) is wrapped by the link emulator if any."""
        name = f"server{len(self.servers)}"
        config = dataclasses.replace(self.base, layers=layers, **overrides)  # type: ignore[arg-type]
        if self.links is not None:
            transport = self.links.transport(name, transport)
        server = Server(
            config,
            identity=Identity.from_seed(f"{name}-{id(self)}".encode()),
            transport=transport,
            wrap_handlers=wrap_handlers,
        )
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(*, task_status: trio.TaskStatus[ServerReady]) -> None:
            try:
                with scope:
                    await server.run(task_status=task_status)
            finally:
                done.set()

        with trio.fail_after(60):
            ready = await self._nursery.start(run)
        local = LocalServer(name, server, ready, scope, done)
        self.servers.append(local)
        return local

    def kill(self, index: int) -> None:
        """Stop a server abruptly, as a crash would: no draining announcement."""
        self.servers[index].scope.cancel()

    async def stop(self, index: int, timeout: float = 30.0) -> None:
        """Stop a server cleanly (announce draining, finish steps) and wait for it."""
        local = self.servers[index]
        local.server.request_stop()
        with trio.fail_after(timeout):
            await local.stopped.wait()


@asynccontextmanager
async def open_local_swarm(
    model: str | Path,
    ranges: Sequence[LayerRange | None] = (),
    *,
    links: LinkEmulator | None = None,
    config: ServerConfig | None = None,
    dht_config: DHTConfig | None = None,
) -> AsyncIterator[LocalSwarm]:
    """A bootstrap DHT node plus one server per range, all online when this yields.

    `config` is the base `ServerConfig` (its ``model``, ``layers`` and DHT initial peers
    are filled in here). Defaults suit tests: short announce TTL, throughput measured.
    `dht_config` is the bootstrap node's (default `DHTConfig()`).
    """
    model = Path(model)
    async with DHTNode.open(Identity.generate(), dht_config or DHTConfig()) as dht:
        base = config or ServerConfig(model=model, announce_ttl=30.0)
        dht_config = dataclasses.replace(base.dht, initial_peers=(dht.address,))
        base = dataclasses.replace(base, model=model, dht=dht_config)
        async with trio.open_nursery() as nursery:
            local = LocalSwarm(model, nursery, dht, base, links)
            for layers in ranges:
                await local.add_server(layers)
            try:
                yield local
            finally:
                nursery.cancel_scope.cancel()
