"""Route planning over block boundaries (pure function, no network)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from swarm.client.routing import Hop, ServerView, plan_route, route_cost
from swarm.directory import RelayView, with_relay_loads
from swarm.errors import RoutingError
from swarm.identity import Identity
from swarm.net.messages import RelayHop
from swarm.types import LayerRange, PeerId


def server(name: str, start: int, stop: int, **kw: object) -> ServerView:
    peer = Identity.from_seed(name.encode()).peer_id
    defaults: dict[str, object] = {"throughput": 100.0, "free_cache_tokens": 10_000}
    defaults.update(kw)
    return ServerView(peer, f"{name}:1", LayerRange(start, stop), **defaults)  # type: ignore[arg-type]


def spans(route: list) -> list[tuple[str, int, int]]:  # type: ignore[type-arg]
    return [(h.server.address.split(":")[0], h.layers.start, h.layers.stop) for h in route]


def test_chain_of_three_covers_in_order() -> None:
    servers = [server("c", 8, 12), server("a", 0, 4), server("b", 4, 8)]
    route = plan_route(servers, LayerRange(0, 12), rng=random.Random(0))
    assert spans(route) == [("a", 0, 4), ("b", 4, 8), ("c", 8, 12)]


def test_prefers_one_fast_server_over_two_hops_when_network_dominates() -> None:
    servers = [server("half1", 0, 6), server("full", 0, 12), server("half2", 6, 12)]
    pings = {s.peer_id: 0.05 for s in servers}
    route = plan_route(servers, LayerRange(0, 12), client_pings=pings, rng=random.Random(0))
    assert spans(route) == [("full", 0, 12)]


def test_avoids_a_slow_link() -> None:
    a, b_slow, b_fast = server("a", 0, 6), server("bslow", 6, 12), server("bfast", 6, 12)
    a = ServerView(**{**a.__dict__, "next_pings": {b_slow.peer_id: 0.4, b_fast.peer_id: 0.002}})
    pings = {a.peer_id: 0.002, b_slow.peer_id: 0.002, b_fast.peer_id: 0.002}
    for seed in range(20):
        route = plan_route(
            [a, b_slow, b_fast], LayerRange(0, 12), client_pings=pings, rng=random.Random(seed)
        )
        assert spans(route) == [("a", 0, 6), ("bfast", 6, 12)]


def test_server_without_cache_is_not_an_edge() -> None:
    servers = [server("full", 0, 12, free_cache_tokens=10), server("a", 0, 6), server("b", 6, 12)]
    route = plan_route(servers, LayerRange(0, 12), cache_tokens_needed=128)
    assert spans(route) == [("a", 0, 6), ("b", 6, 12)]


def test_banned_draining_and_uncovered_blocks() -> None:
    a, b = server("a", 0, 6), server("b", 6, 12)
    with pytest.raises(RoutingError, match="block 6"):
        plan_route([a, b], LayerRange(0, 12), banned={b.peer_id})
    drained = ServerView(**{**b.__dict__, "state": "draining"})
    with pytest.raises(RoutingError, match="block 6"):
        plan_route([a, drained], LayerRange(0, 12))
    with pytest.raises(RoutingError, match="block 0"):
        plan_route([], LayerRange(0, 12))


def test_starts_mid_span_and_trims_the_last_hop() -> None:
    servers = [server("a", 0, 8), server("b", 4, 12)]
    route = plan_route(servers, LayerRange(2, 10))
    assert spans(route) == [("a", 2, 8), ("b", 8, 10)]


def test_ties_are_broken_at_random() -> None:
    twins = [server("x", 0, 12), server("y", 0, 12)]
    picks = Counter(
        spans(plan_route(twins, LayerRange(0, 12), rng=random.Random(seed)))[0][0]
        for seed in range(200)
    )
    assert picks["x"] > 40 and picks["y"] > 40


def test_load_spreads_to_idle_replica() -> None:
    busy, idle = server("busy", 0, 12, active_sessions=4), server("idle", 0, 12)
    for seed in range(20):
        route = plan_route([busy, idle], LayerRange(0, 12), rng=random.Random(seed))
        assert spans(route)[0][0] == "idle"


def test_route_cost_adds_network_and_compute() -> None:
    s = server("a", 0, 10, throughput=100.0)
    pings = {s.peer_id: 0.02}
    route = plan_route([s], LayerRange(0, 10), client_pings=pings)
    # in: 10 ms, compute: 10 ms, back: 10 ms, plus the per-hop constant
    assert route_cost(route, client_pings=pings) == pytest.approx(0.0305, abs=1e-6)
    assert isinstance(route[0].server.peer_id, PeerId)


def test_a_penalised_server_is_avoided_but_still_used_when_alone() -> None:
    slow, other = server("slow", 0, 12), server("other", 0, 12)
    rng = random.Random(0)
    picks = Counter(
        spans(plan_route([slow, other], LayerRange(0, 12), rng=rng))[0][0] for _ in range(50)
    )
    assert picks["slow"] > 0 and picks["other"] > 0  # equal servers share the load
    penalties = {slow.peer_id: 1.0}
    for _ in range(50):
        route = plan_route([slow, other], LayerRange(0, 12), penalties=penalties, rng=rng)
        assert spans(route) == [("other", 0, 12)]
    route = plan_route([slow], LayerRange(0, 12), penalties={slow.peer_id: 100.0}, rng=rng)
    assert spans(route) == [("slow", 0, 12)]


def relayed(name: str, start: int, stop: int, load: float = 0.0, **kw: object) -> ServerView:
    """A server dialed through a relay (its address is the relay's) whose load is ``load``."""
    relay = Identity.from_seed(f"relay-{name}".encode()).peer_id
    hop = RelayHop(peer_id=relay, host=f"relay-{name}", port=1)
    return server(name, start, stop, relays=(hop,), relay_load=load, **kw)


def test_a_direct_replica_beats_a_relayed_one_of_equal_compute() -> None:
    direct, via = server("direct", 0, 12), relayed("via", 0, 12)
    # never pinged: the relayed path counts two unknown legs
    for seed in range(20):
        route = plan_route([via, direct], LayerRange(0, 12), rng=random.Random(seed))
        assert spans(route) == [("direct", 0, 12)]
    # pinged: the client's ping to the relayed one went through its relay (two legs)
    pings = {direct.peer_id: 0.010, via.peer_id: 0.020}
    for seed in range(20):
        route = plan_route(
            [via, direct], LayerRange(0, 12), client_pings=pings, rng=random.Random(seed)
        )
        assert spans(route) == [("direct", 0, 12)]
    # the next hop after a server: that server's announced ping, also through the relay
    a = server("a", 0, 6, next_pings={direct.peer_id: 0.010, via.peer_id: 0.020})
    d2, v2 = server("direct", 6, 12), relayed("via", 6, 12)
    back = {a.peer_id: 0.01, d2.peer_id: 0.01, v2.peer_id: 0.01}
    for seed in range(20):
        route = plan_route(
            [a, v2, d2], LayerRange(0, 12), client_pings=back, rng=random.Random(seed)
        )
        assert spans(route) == [("a", 0, 6), ("direct", 6, 12)]
    assert route_cost([Hop(via, LayerRange(0, 12))], client_pings=pings) > route_cost(
        [Hop(direct, LayerRange(0, 12))], client_pings=pings
    )


def test_a_less_loaded_relay_beats_a_loaded_one() -> None:
    busy, idle = relayed("busy", 0, 12, load=0.9), relayed("idle", 0, 12, load=0.1)
    pings = {busy.peer_id: 0.02, idle.peer_id: 0.02}  # the same measured paths
    for seed in range(20):
        route = plan_route(
            [busy, idle], LayerRange(0, 12), client_pings=pings, rng=random.Random(seed)
        )
        assert spans(route) == [("idle", 0, 12)]
    # a direct server's relay_load means nothing (it has no relay)
    direct = server("direct", 0, 12, relay_load=1.0)
    assert route_cost([Hop(direct, LayerRange(0, 12))], client_pings=pings) == pytest.approx(
        route_cost([Hop(server("direct", 0, 12), LayerRange(0, 12))], client_pings=pings)
    )


def test_a_relayed_server_is_dialed_through_its_least_loaded_relay() -> None:
    r1, r2, r3 = (Identity.from_seed(n).peer_id for n in (b"r1", b"r2", b"r3"))
    hops = tuple(
        RelayHop(peer_id=p, host=f"10.0.0.{i}", port=9) for i, p in enumerate((r1, r2, r3))
    )
    view = replace(server("x", 0, 12, relays=hops), address="10.0.0.0:9")
    plain = server("plain", 0, 12)
    loads = [RelayView(r2, "10.0.0.1", 9, circuits=1, max_circuits=10),
             RelayView(r1, "10.0.0.0", 9, circuits=8, max_circuits=10)]  # fmt: skip
    out = with_relay_loads([view, plain], loads)
    assert out[0].address == "10.0.0.1:9" and out[0].relay_load == pytest.approx(0.1)
    assert out[1] == plain
    # a relay that announces no circuits counts as full
    assert with_relay_loads([view], [RelayView(r3, "10.0.0.2", 9, 0, 0)])[0].relay_load == 1.0
    # no relay of its announces itself: dialed through its first, load unknown (0)
    assert with_relay_loads([view], [])[0] == view


def test_an_unproven_record_ranks_lower_but_still_covers() -> None:
    # a record stays usable while its proof (the client's ping) waits, ranked lower
    proven, unproven = server("proven", 0, 12), server("unproven", 0, 12)
    rng = random.Random(0)
    for _ in range(50):
        route = plan_route(
            [unproven, proven], LayerRange(0, 12), unproven={unproven.peer_id}, rng=rng
        )
        assert spans(route) == [("proven", 0, 12)]
    # the only cover of 4:8 is unproven: still used there, and only there
    halves = [server("a", 0, 4), server("b", 8, 12), server("only", 4, 8)]
    route = plan_route(halves, LayerRange(0, 12), unproven={halves[2].peer_id}, rng=rng)
    assert spans(route) == [("a", 0, 4), ("only", 4, 8), ("b", 8, 12)]


def test_a_server_whose_ping_failed_ranks_far_lower_but_still_covers() -> None:
    # a crashed server's record outlives it: 100 times as fast on paper, it is still passed
    # over for a live one once the client's ping to it failed
    dead = server("dead", 0, 12, throughput=1000.0)
    live = server("live", 0, 12, throughput=10.0)
    rng = random.Random(0)
    gone = {dead.peer_id}
    for _ in range(50):
        route = plan_route([dead, live], LayerRange(0, 12), unproven=gone, rng=rng)
        assert spans(route) == [("dead", 0, 12)]  # unproven alone: its claim still wins
        route = plan_route(
            [dead, live], LayerRange(0, 12), unproven=gone, unreachable=gone, rng=rng
        )
        assert spans(route) == [("live", 0, 12)]
    # the only cover of 4:8: still tried there (a ping can fail for a live server too)
    halves = [server("a", 0, 4), server("b", 8, 12), server("only", 4, 8)]
    route = plan_route(halves, LayerRange(0, 12), unreachable={halves[2].peer_id}, rng=rng)
    assert spans(route) == [("a", 0, 4), ("only", 4, 8), ("b", 8, 12)]


def test_a_server_costs_what_its_peers_measured_it_delivering() -> None:
    # "liar" announces 1,000 tokens/s on [2,4) but "head", before it, measured 10; the
    # honest replica announces (and delivers) 100: the route takes the replica
    liar, honest = server("liar", 2, 4, throughput=1000.0), server("honest", 2, 4)
    head = server("head", 0, 2, next_delivered={liar.peer_id: 10.0})
    servers = [head, liar, honest]
    route = plan_route(servers, LayerRange(0, 4), rng=random.Random(0))
    assert spans(route) == [("head", 0, 2), ("honest", 2, 4)]
    # a measurement in an unproven record counts for nothing: the claim stands
    route = plan_route(servers, LayerRange(0, 4), rng=random.Random(0), unproven={head.peer_id})
    assert spans(route) == [("head", 0, 2), ("liar", 2, 4)]
