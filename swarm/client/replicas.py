"""Stateful replicas of a session's hops, for the ``redundant:K`` policy.

For each hop of the main chain, K-1 more one-hop `Chain` s run the same layers
on other servers (the client relays the hop's input to them every step: "relay mode"), so
each keeps its own KV cache and a step costs each replica one token of compute, not a
forward of the whole history. Their outputs are the votes the `Verifier` counts. A replica
that fails is dropped (that hop then has fewer votes; referees fill in with stateless
forwards). Replicas belong to one generation's main chain; a rollback opens a new set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager, AsyncExitStack

import torch
import trio

from swarm.client.chain import Chain, StepResult
from swarm.errors import RoutingError, SessionError
from swarm.types import LayerRange, PeerId

__all__ = ["Replicas"]

log = logging.getLogger(__name__)

OpenFn = Callable[[LayerRange, Collection[PeerId]], AbstractAsyncContextManager[Chain]]


class Replicas:
    """Replica sessions per hop index of one main session; use inside an `AsyncExitStack`."""

    def __init__(self, open_session: OpenFn, stack: AsyncExitStack) -> None:
        self._open = open_session
        self._stack = stack
        self.by_hop: dict[int, list[tuple[LayerRange, Chain]]] = {}

    async def open_for(self, main: Chain, count: int) -> None:
        """Open up to ``count`` one-hop replicas of each hop (fewer if servers are short)."""
        for k, hop in enumerate(main.route):
            used = {hop.server.peer_id}
            for _ in range(count):
                try:
                    replica = await self._stack.enter_async_context(self._open(hop.layers, used))
                except (RoutingError, SessionError) as exc:
                    log.info("no replica for layers %s: %s", hop.layers, exc)
                    break
                if len(replica.route) != 1:  # split over servers: no single peer to vote
                    await replica.aclose()
                    break
                used.add(replica.route[0].server.peer_id)
                self.by_hop.setdefault(k, []).append((hop.layers, replica))

    async def step(self, result: StepResult) -> None:
        """Relay each hop's input of the main chain's step ``result`` to its replicas, all at
        once."""

        async def one(k: int, i: int, replica: Chain) -> None:
            hop = result.hops[k]
            x, pos = hop.input, hop.positions
            try:
                await replica.step(x, pos, keep=result.keep)
            except (RoutingError, SessionError) as exc:
                log.info("replica of hop %d dropped: %s", k, exc)
                self.by_hop[k][i] = (LayerRange(0, 0), replica)  # never matches again

        async with trio.open_nursery() as nursery:
            for k, replicas in self.by_hop.items():
                if k >= len(result.hops) or result.hops[k].hop.layers != replicas[0][0]:
                    continue  # the main route changed under this hop: replicas no longer match
                for i, (_, replica) in enumerate(replicas):
                    nursery.start_soon(one, k, i, replica)

    def answer(self, peer: PeerId, layers: LayerRange, length: int) -> torch.Tensor | None:
        """A replica's outputs over the whole history, if ``peer`` replicates ``layers``."""
        for replicas in self.by_hop.values():
            for replica_layers, replica in replicas:
                if replica_layers == layers and replica.route[0].server.peer_id == peer:
                    history = replica.hop(0).history
                    if not len(history) or history.tokens != length:
                        return None
                    return history.tensors(len(history))[2]  # (batch, T, hidden)
        return None

    def peers(self, layers: LayerRange) -> list[PeerId]:
        return [
            replica.route[0].server.peer_id
            for replicas in self.by_hop.values()
            for replica_layers, replica in replicas
            if replica_layers == layers
        ]
