"""In-process DHT swarms for tests and benchmarks: many `DHTNode`s sharing one loop thread."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from swarm.dht import DatagramLinks, DHTConfig, DHTNode
from swarm.identity import Identity

__all__ = ["DHTCluster", "open_dht_cluster"]


class DHTCluster:
    """Nodes on 127.0.0.1; node 0 is every other node's initial peer. ``stop(i)`` closes one."""

    def __init__(self) -> None:
        self.nodes: list[DHTNode] = []
        self._stacks: list[AsyncExitStack] = []
        self.stopped: set[int] = set()

    @property
    def live(self) -> list[DHTNode]:
        return [n for i, n in enumerate(self.nodes) if i not in self.stopped]

    async def add(
        self, identity: Identity, config: DHTConfig, links: DatagramLinks | None = None
    ) -> DHTNode:
        """Open one more node (raises what `DHTNode.open` raises); ``links``: its datagrams
        go through emulated links (`swarm.testing.links.DatagramLinkEmulator`)."""
        stack = AsyncExitStack()
        try:
            node = await stack.enter_async_context(DHTNode.open(identity, config, links=links))
        except BaseException:
            await stack.aclose()
            raise
        self.nodes.append(node)
        self._stacks.append(stack)
        return node

    async def stop(self, index: int) -> None:
        """Close node ``index`` (its socket is gone; peers see timeouts)."""
        if index not in self.stopped:
            self.stopped.add(index)
            await self._stacks[index].aclose()

    async def aclose(self) -> None:
        for index in reversed(range(len(self.nodes))):
            await self.stop(index)


@asynccontextmanager
async def open_dht_cluster(
    size: int,
    config: DHTConfig | None = None,
    *,
    seed: str = "dht-node",
    initial_peers: tuple[str, ...] = (),
    links: DatagramLinks | None = None,
) -> AsyncIterator[DHTCluster]:
    """Open ``size`` nodes with identities ``Identity.from_seed(f"{seed}-{i}")``.

    Node 0 joins ``initial_peers`` (none: it starts a swarm); the others join through node 0.
    Every node is closed on exit.
    """
    base = config or DHTConfig()
    cluster = DHTCluster()
    try:
        for i in range(size):
            peers = initial_peers if i == 0 else (cluster.nodes[0].address,)
            node_config = dataclasses.replace(base, port=0, initial_peers=peers)
            await cluster.add(Identity.from_seed(f"{seed}-{i}".encode()), node_config, links)
        yield cluster
    finally:
        await cluster.aclose()
