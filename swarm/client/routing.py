"""Route planning: the cheapest chain of servers that covers layers [start, stop).

Dijkstra over block boundaries. A state is "blocks [start, b) are covered and the last
hop was server s" (the previous server matters because network cost depends on which
server talks to which). From boundary ``a`` a server whose span contains ``a`` is used to
the end of its span (as Petals does; it keeps the graph small and never loses a cover:
any chain that stops a server early can start the next one later instead). The chain may
cover past ``stop``; the last hop then runs only up to ``stop``.

Edge cost, in seconds for one step of one token:
  network  half the round-trip time into the server: the client's own measured ping for
           the first hop, else the previous server's announced ping to it, else the
           client's ping, else `RouteCosts.unknown_rtt`. Pings to a relayed server are
           measured through its relay (its `ServerView.address` is the relay's, and both
           the client and the servers that announce pings dial that), so they already hold
           the extra leg; one never measured counts `unknown_rtt` for each of its two legs;
  relay    for a relayed server, `RouteCosts.per_hop` for the splice plus
           `RouteCosts.relay_busy` × the relay's announced share of circuits in use
           (`ServerView.relay_load`): a busy relay queues and throttles what it forwards;
           nothing once the client's channel to it was upgraded to a direct connection;
  compute  blocks used / blocks served / tokens-per-second of the server: the one it
           announced (which a batching server measures at the batch a newcomer would join:
           its current sessions plus one, so it already falls as the server fills), or,
           where that is less, what the servers before it measured it delivering
           (`swarm.directory.counted_throughput`, from proven records: a server that
           overstates, or is slower than it says, costs what it delivers);
  load     compute × `RouteCosts.load_penalty` × the server's active sessions: what the
           announced figure leaves out (prompts chunked between the steps, sessions that
           opened since the last announcement);
  return   half the client's ping to the last server, whose output comes back to it.
Each edge's cost is multiplied by a random factor in [1, 1 + `RouteCosts.jitter`] so that
near-equal routes are picked at random and load spreads, by ``1 + penalty`` for a server
the client recently found too slow (`Penalties`), and by ``1 + RouteCosts.unproven`` for a
server whose record is not proven yet (it has not answered the client's ping as its `PeerId`
at its address: anyone may sign a record naming any address). An unproven record stays
usable while its proof waits, ranked lower: of two servers of otherwise equal cost the
proven one is taken, and an unproven one still carries a route nothing else covers.
A server without enough free cache for the session is not an edge; banned and not-online
servers are skipped.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from swarm.directory import ServerView, counted_throughput, delivered_by_peers
from swarm.errors import RoutingError
from swarm.types import LayerRange, PeerId, ServerState

__all__ = ["Hop", "RouteCosts", "ServerView", "plan_route", "route_cost"]


@dataclass(frozen=True)
class Hop:
    """One hop of a route: `server` runs layers `layers` (a sub-range of its span)."""

    server: ServerView
    layers: LayerRange


@dataclass(frozen=True)
class RouteCosts:
    """Constants of the cost model (seconds unless noted)."""

    unknown_rtt: float = 0.15
    per_hop: float = 0.0005  # serialization and scheduling on each hop
    load_penalty: float = 0.25  # relative slowdown per active session, beyond throughput
    jitter: float = 0.05  # relative random noise added to each edge for tie-breaking
    relay_busy: float = 0.02  # added through a relay with all its circuits in use
    unproven: float = 0.5  # relative extra cost of a server whose record is not proven
    # relative extra cost of a server whose last ping from this client failed: a crashed
    # server's record outlives it by up to its TTL, and opening a hop on it costs a
    # ``connect_timeout``; still used where nothing else covers its layers
    unreachable: float = 10.0


def _rtt(
    prev: ServerView | None,
    server: ServerView,
    client_pings: Mapping[PeerId, float],
    costs: RouteCosts,
) -> float:
    if prev is not None and server.peer_id in prev.next_pings:
        return prev.next_pings[server.peer_id]
    return client_pings.get(server.peer_id, _unknown_rtt(server, costs))


def _unknown_rtt(server: ServerView, costs: RouteCosts) -> float:
    """What an unmeasured path is taken to cost: a relayed one has two legs."""
    return costs.unknown_rtt * (2 if server.path == "relayed" else 1)


def _relay_cost(server: ServerView, costs: RouteCosts) -> float:
    if server.path != "relayed":  # direct, or upgraded to a direct connection
        return 0.0
    return costs.per_hop + costs.relay_busy * min(max(server.relay_load, 0.0), 1.0)


def _edge_cost(
    prev: ServerView | None,
    server: ServerView,
    blocks: int,
    client_pings: Mapping[PeerId, float],
    costs: RouteCosts,
    throughput: float | None = None,
) -> float:
    network = _rtt(prev, server, client_pings, costs) / 2
    speed = server.throughput if throughput is None else throughput
    compute = blocks / len(server.layers) / max(speed, 1e-9)
    load = compute * costs.load_penalty * server.active_sessions
    return network + compute + load + costs.per_hop + _relay_cost(server, costs)


def plan_route(
    servers: Iterable[ServerView],
    layers: LayerRange,
    *,
    client_pings: Mapping[PeerId, float] | None = None,
    cache_tokens_needed: int = 0,
    banned: Collection[PeerId] = (),
    penalties: Mapping[PeerId, float] | None = None,
    unproven: Collection[PeerId] = (),
    unreachable: Collection[PeerId] = (),
    costs: RouteCosts | None = None,
    rng: random.Random | None = None,
) -> list[Hop]:
    """The cheapest chain of servers covering `layers`.

    ``banned`` servers are never used; a server with a ``penalties`` entry p costs 1 + p
    times as much, an ``unproven`` one (its record not yet proven by a ping)
    1 + ``costs.unproven`` times as much, an ``unreachable`` one (the client's last ping to
    it failed) 1 + ``costs.unreachable`` times as much more; all are still used when nothing
    cheaper covers their layers.

    Raises `RoutingError` naming the first block no usable server covers.
    Cost: O(E log E) with E the number of (boundary, server) pairs; a few hundred
    servers plan in well under a millisecond.
    """
    costs = costs or RouteCosts()
    pings = client_pings or {}
    penalty = penalties or {}
    rng = rng or random.Random()
    servers = list(servers)
    # what servers measured of others, from proven records only: anyone may sign a record
    # that claims its next servers are slow
    measured = delivered_by_peers(s for s in servers if s.peer_id not in unproven)
    usable = [
        s
        for s in servers
        if s.state == ServerState.ONLINE
        and s.peer_id not in banned
        and s.newcomer_tokens >= cache_tokens_needed  # free, or reclaimable for us
        and s.throughput > 0
        and s.layers.start < layers.stop
        and s.layers.stop > layers.start
    ]
    speed = [counted_throughput(s, measured.get(s.peer_id)) for s in usable]
    # Dijkstra; a state is (boundary, index of the last server or -1 for the client).
    counter = itertools.count()
    best: dict[tuple[int, int], float] = {(layers.start, -1): 0.0}
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    queue: list[tuple[float, int, int, int]] = [(0.0, next(counter), layers.start, -1)]
    while queue:
        cost, _, boundary, last = heapq.heappop(queue)
        if cost > best.get((boundary, last), float("inf")):
            continue
        if boundary >= layers.stop:
            return _unwind(parent, (boundary, last), usable, layers)
        prev = usable[last] if last >= 0 else None
        for i, server in enumerate(usable):
            if not (server.layers.start <= boundary < server.layers.stop):
                continue
            end = min(server.layers.stop, layers.stop)
            step = _edge_cost(prev, server, end - boundary, pings, costs, speed[i])
            if end >= layers.stop:  # the last hop also sends its output back to the client
                step += pings.get(server.peer_id, _unknown_rtt(server, costs)) / 2
            step *= (1.0 + rng.uniform(0.0, costs.jitter)) * (1.0 + penalty.get(server.peer_id, 0))
            if server.peer_id in unproven:
                step *= 1.0 + costs.unproven
            if server.peer_id in unreachable:
                step *= 1.0 + costs.unreachable
            state = (end, i)
            if cost + step < best.get(state, float("inf")):
                best[state] = cost + step
                parent[state] = (boundary, last)
                heapq.heappush(queue, (cost + step, next(counter), end, i))
    reached = max((b for b, _ in best), default=layers.start)
    raise RoutingError(
        f"no usable server covers block {reached} "
        f"(needed layers {layers}; {len(usable)} usable servers)"
    )


def _unwind(
    parent: Mapping[tuple[int, int], tuple[int, int]],
    state: tuple[int, int],
    usable: list[ServerView],
    layers: LayerRange,
) -> list[Hop]:
    hops: list[Hop] = []
    while state[1] >= 0:
        prev_state = parent[state]
        hops.append(Hop(usable[state[1]], LayerRange(prev_state[0], state[0])))
        state = prev_state
    hops.reverse()
    return hops


def route_cost(
    hops: Iterable[Hop],
    *,
    client_pings: Mapping[PeerId, float] | None = None,
    costs: RouteCosts | None = None,
) -> float:
    """The modelled per-token cost of a route (no jitter), for logs and benchmarks."""
    costs = costs or RouteCosts()
    pings = client_pings or {}
    total, prev = 0.0, None
    for hop in hops:
        total += _edge_cost(prev, hop.server, len(hop.layers), pings, costs)
        prev = hop.server
    if prev is not None:
        total += pings.get(prev.peer_id, _unknown_rtt(prev, costs)) / 2
    return total
