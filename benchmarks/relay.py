"""Relays (issue 22): what a relayed hop costs, what a relay costs, how fast relaying heals.

    python benchmarks/relay.py                    # everything below
    python benchmarks/relay.py --only chain       # one part: chain, relay, attach, punch

1. chain: an in-process swarm of a tiny model (hidden 256, 8 layers) with two relay nodes;
   servers [0,3) [3,6) [6,8); the middle one either direct or behind `Undialable` (it
   accepts nothing and is dialed through a relay, pushes in and out included). Per-token
   median latency and tokens/s of 32 greedy tokens, on loopback and with 25 ms one way on
   every dialed link (a relayed hop then has two: dialer to relay, and the relayed
   server's own outbound connection to the relay). Direct and relayed runs alternate.
2. relay: a `swarm dht` process is the relay; this process holds a reservation at it and
   dials circuits to itself through it. The relay's resident memory per idle circuit
   (60 circuits) and its CPU seconds per MB relayed (64 MB echoed, both directions).
3. attach: time from a relayed server's start to ready (dial-back check, two relays
   attached, announced), against a direct server's; and from killing the relay a server
   uses to having two relays again (re-attach and re-announce).
4. punch: direct connections through the relay (`swarm.net.punch`), loopback only (the
   punched sockets are raw TCP, outside the link emulator): the time `dial_direct` takes
   over a relayed channel (exchange, simultaneous open, handshake), and the 3-server
   chain's per-token latency with the middle hop direct, relayed, relayed but upgraded
   (the defaults: the client and the first server both punch to it), and relayed with
   upgrades on but a middle server whose punches never connect (`NeverPunches`: the
   fallback), with the time from opening the model to a first answer. Modes alternate.

Figures go in benchmarks/README.md. Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil
import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.identity import Identity
from swarm.net.handshake import open_channel
from swarm.net.messages import ForwardRequest, ForwardResponse
from swarm.net.methods import HandlerRegistry
from swarm.net.pool import open_connection_pool
from swarm.net.punch import HolePunchService, PunchConfig, dial_direct
from swarm.net.relay import RelayService, hold_reservation
from swarm.net.rpc import CallContext
from swarm.net.rpc_server import RpcServer
from swarm.net.surface import FORWARD, call_forward
from swarm.net.transport import TCPTransport
from swarm.server.reachability import ReachabilityConfig
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.links import LinkEmulator, LinkSpec
from swarm.testing.processes import ProcessGroup
from swarm.testing.reach import NeverPunches, Undialable, open_relay_node
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange, PeerId

PROMPT = list(range(100, 116))
NEW_TOKENS = 32
TINY = {"num_layers": 8, "hidden": 256, "heads": 8, "kv_heads": 8, "intermediate": 688}
REACH = ReachabilityConfig(
    check_timeout=5.0, retry=0.3, offer_relay=False, port_mapping=False, direct=None
)  # direct upgrades (on by default) only where a part says so


def tiny(workdir: Path) -> Path:
    path = workdir / "tiny"
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **TINY)
    return path


async def chain_once(path: Path, relayed: bool, delay: float, rounds: int) -> list[float]:
    links = LinkEmulator(LinkSpec(delay=delay))
    async with links, open_local_swarm(path, links=links) as local, AsyncExitStack() as stack:
        for _ in range(2):
            await stack.enter_async_context(open_relay_node(local.dht_address))
        await local.add_server(LayerRange(0, 3), reachability=REACH)
        middle = Undialable() if relayed else None
        await local.add_server(LayerRange(3, 6), reachability=REACH, transport=middle)
        await local.add_server(LayerRange(6, 8), reachability=REACH)
        config = ClientConfig(initial_peers=(local.dht_address,), direct=None)
        async with AsyncRemoteModel.open(path, config, transport=links.transport("client")) as m:
            await m.generate(PROMPT, 4)
            times: list[float] = []
            for _ in range(rounds):
                result = await m.generate_detailed(PROMPT, NEW_TOKENS)
                assert [h["path"] for h in result.route][1] == ("relayed" if relayed else "direct")
                times.extend(result.timings[1:])
    return times


def chain(workdir: Path, rounds: int) -> None:
    path = tiny(workdir)
    for delay in (0.0, 0.025):
        samples: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(2):  # alternate direct and relayed
            for relayed in (False, True):
                samples[relayed] += trio.run(chain_once, path, relayed, delay, rounds)
        direct, relayed_ = (statistics.median(samples[k]) for k in (False, True))
        print(
            f"[chain, {delay * 1e3:.0f} ms per link] middle hop direct {direct * 1e3:.2f} "
            f"ms/token ({1 / direct:.1f} tok/s), relayed {relayed_ * 1e3:.2f} ms/token "
            f"({1 / relayed_:.1f} tok/s), ratio {relayed_ / direct:.3f}, extra "
            f"{(relayed_ - direct) * 1e3:.2f} ms/token",
            flush=True,
        )


class Echo:
    async def rpc_forward(self, request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
        return ForwardResponse(hidden_states=request.hidden_states)


async def relay_costs(dht: str, relay_pid: int, relay_port: int, relay_peer: PeerId) -> None:
    proc = psutil.Process(relay_pid)
    me = Identity.generate()
    rpc = RpcServer(me, HandlerRegistry([FORWARD.bind(Echo().rpc_forward)]))
    async with trio.open_nursery() as nursery, open_connection_pool(me) as pool:
        conn = await pool.get("127.0.0.1", relay_port, relay_peer)
        await nursery.start(
            hold_reservation, conn, TCPTransport(), "127.0.0.1", relay_port, rpc.handle_stream
        )
        dialer = Identity.generate()
        await trio.sleep(0.5)
        rss0 = proc.memory_info().rss
        held = []
        # within the quotas: 60 of 64 circuits per relayed peer, 6 per dialer address, and
        # a dialer identity each (the relayed peer takes 8 channels per peer)
        for i in range(60):
            transport = TCPTransport(f"127.0.0.{2 + i % 10}")
            held.append(
                await open_channel(
                    transport,
                    "127.0.0.1",
                    relay_port,
                    Identity.generate(),
                    expected_peer=me.peer_id,
                )
            )
        await trio.sleep(0.5)
        rss1 = proc.memory_info().rss
        for channel in held:
            await channel.aclose()
        print(
            f"[relay] resident memory per idle circuit {(rss1 - rss0) / len(held) / 1024:.1f} KiB "
            f"({len(held)} circuits, {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB)",
            flush=True,
        )
        payload = torch.zeros(1, 1024 * 1024 // 8, dtype=torch.int64)  # 1 MiB a message
        request = ForwardRequest(
            hidden_states=payload,
            positions=torch.zeros(1, payload.shape[1], dtype=torch.int64),
            layer_range=LayerRange(0, 1),
        )
        async with open_connection_pool(dialer) as dialer_pool:
            conn = await dialer_pool.get("127.0.0.1", relay_port, me.peer_id)
            await call_forward(conn, request)
            cpu0 = sum(proc.cpu_times()[:2])
            started = time.perf_counter()
            for _ in range(32):  # 32 MiB each way
                await call_forward(conn, request)
            wall = time.perf_counter() - started
            cpu = sum(proc.cpu_times()[:2]) - cpu0
        print(
            f"[relay] {cpu / 64 * 1e3:.2f} ms relay CPU per MB relayed (64 MB in {wall:.2f} s "
            f"wall, {64 / wall:.0f} MB/s through the relay, endpoints in one process)",
            flush=True,
        )
        nursery.cancel_scope.cancel()


def relay(workdir: Path) -> None:
    key = workdir / "relay-id"
    ident = Identity.load_or_create(key)
    with ProcessGroup() as group:
        proc, dht = group.start_dht("--identity", str(key))
        line = next(line for line in proc.lines if "relay and dial-back" in line)
        port = int(re.findall(r":(\d+)", line)[-1])
        trio.run(relay_costs, dht, proc.pid, port, ident.peer_id)


async def attach_times(path: Path) -> None:
    async with open_local_swarm(path) as local, AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(open_relay_node(local.dht_address)) for _ in range(3)
        ]
        started = trio.current_time()
        await local.add_server(LayerRange(0, 8), reachability=REACH)
        direct = trio.current_time() - started
        started = trio.current_time()
        hidden = await local.add_server(
            LayerRange(0, 8), reachability=REACH, transport=Undialable()
        )
        relayed = trio.current_time() - started
        keeper = hidden.server.reachability
        assert keeper is not None and len(keeper.relays) == 2
        dead = next(n for n in nodes if n.peer_id == keeper.relays[0].peer_id)
        killed = trio.current_time()
        await dead.kill()
        while len(keeper.relays) < 2 or dead.peer_id in {h.peer_id for h in keeper.relays}:
            await trio.sleep(0.01)
        healed = trio.current_time() - killed
    print(
        f"[attach] start to ready: direct server {direct:.2f} s, relayed server {relayed:.2f} s "
        f"(check, two relays, announce; both include loading and measuring the model); "
        f"relay killed -> two relays again {healed:.2f} s",
        flush=True,
    )


async def punch_chain_once(path: Path, mode: str, rounds: int) -> tuple[list[float], float]:
    """Per-token times of the chain with the middle hop ``mode`` (direct, relayed, upgraded:
    relayed with the defaults' upgrade, failing: relayed, upgrades on, but its punches never
    connect), and the seconds from opening the model to the end of a first 4-token answer."""
    upgrading = mode in ("upgraded", "failing")
    punch = PunchConfig() if upgrading else None
    never = NeverPunches()
    async with open_local_swarm(path) as local, AsyncExitStack() as stack:
        for _ in range(2):
            await stack.enter_async_context(open_relay_node(local.dht_address))
        middle = None if mode == "direct" else Undialable()
        wrap = never.wrap if mode == "failing" else None
        reach = dataclasses.replace(REACH, direct=punch)  # None: no punches, nor answers
        await local.add_server(
            LayerRange(3, 6), reachability=reach, transport=middle, wrap_handlers=wrap
        )
        await local.add_server(LayerRange(6, 8), reachability=REACH)
        await local.add_server(LayerRange(0, 3), reachability=reach)
        config = ClientConfig(initial_peers=(local.dht_address,), direct=punch)
        started = trio.current_time()
        async with AsyncRemoteModel.open(path, config) as m:
            await m.generate(PROMPT, 4)
            first = trio.current_time() - started
            times: list[float] = []
            for _ in range(rounds):
                result = await m.generate_detailed(PROMPT, NEW_TOKENS)
                hop = result.route[1]
                assert (hop["path"], hop["upgraded"]) == {
                    "direct": ("direct", False),
                    "relayed": ("relayed", False),
                    "upgraded": ("direct", True),
                    "failing": ("relayed", False),
                }[mode], hop
                times.extend(result.timings[1:])
    return times, first


async def upgrade_times(trials: int) -> list[float]:
    relay_id, relayed_id, dialer = (Identity.generate() for _ in range(3))
    relay_service = RelayService(relay_id)
    relay_rpc = RpcServer(relay_id, HandlerRegistry([relay_service.binding()]), relay=relay_service)
    many = {f"{k}_{x}": 100.0 for k in ("peer", "host", "group") for x in ("rate", "burst")}
    config = PunchConfig(window=2.0, **many)
    registry = HandlerRegistry([FORWARD.bind(Echo().rpc_forward)])
    relayed_rpc = RpcServer(relayed_id, registry)
    service = HolePunchService(relayed_rpc.handle_stream, config)
    relayed_rpc.handlers = registry.with_bindings([service.binding()])
    took = []
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        port = await nursery.start(relay_rpc.serve, "127.0.0.1", 0)
        async with open_connection_pool(relayed_id) as pool, open_connection_pool(dialer) as mine:
            conn = await pool.get("127.0.0.1", port, relay_id.peer_id)
            await nursery.start(
                hold_reservation, conn, TCPTransport(), "127.0.0.1", port, relayed_rpc.handle_stream
            )
            relayed = await mine.get("127.0.0.1", port, relayed_id.peer_id)
            for _ in range(trials):
                started = time.perf_counter()
                channel = await dial_direct(
                    relayed, dialer, relayed_id.peer_id, towards="127.0.0.1", punch=config
                )
                took.append(time.perf_counter() - started)
                await channel.aclose()
            nursery.cancel_scope.cancel()
    return took


def punch(workdir: Path, rounds: int) -> None:
    took = trio.run(upgrade_times, 20)
    print(
        f"[punch] dial_direct over a relayed channel on loopback: median "
        f"{statistics.median(took) * 1e3:.1f} ms, max {max(took) * 1e3:.1f} ms (20 trials)",
        flush=True,
    )
    path = tiny(workdir)
    modes = ("direct", "relayed", "upgraded", "failing")
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    firsts: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(2):  # alternate
        for mode in modes:
            times, first = trio.run(punch_chain_once, path, mode, rounds)
            samples[mode] += times
            firsts[mode].append(first)
    medians = {mode: statistics.median(v) for mode, v in samples.items()}
    print(
        "[punch, loopback] middle hop "
        + ", ".join(f"{m} {t * 1e3:.2f} ms/token ({1 / t:.1f} tok/s)" for m, t in medians.items()),
        flush=True,
    )
    print(
        "[punch, loopback] open to first 4-token answer: "
        + ", ".join(f"{m} {' / '.join(f'{t:.2f}' for t in v)} s" for m, v in firsts.items()),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("chain", "relay", "attach", "punch"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.only in (None, "chain"):
            chain(workdir, args.rounds)
        if args.only in (None, "relay"):
            relay(workdir)
        if args.only in (None, "attach"):
            trio.run(attach_times, tiny(workdir))
        if args.only in (None, "punch"):
            punch(workdir, args.rounds)


if __name__ == "__main__":
    main()
