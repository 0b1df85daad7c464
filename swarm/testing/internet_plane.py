"""The DHT plane of the internet simulation: one process's slice of the DHT nodes.

A `DHTSlice` opens some of the simulated swarm's DHT nodes in this process, all of them
sending through one `DatagramLinkEmulator`, and turns a share of them into sybils (silent,
or answering junk: `swarm.testing.sybils`). A swarm split across processes
(`SimConfig.processes`) has one slice per process: each emulates the delay and loss of the
datagrams its own nodes send, so every datagram crosses exactly one emulated link whichever
processes its ends live in. Every process places every address in the same region
(`region_of`, from the port) and draws the same delays (`region_delays`, from the seed), so
the slices agree on the distances without telling each other.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import random
import zlib
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import trio

from swarm.dht import DHTConfig, DHTNode, StorageConfig, TimingConfig
from swarm.directory import block_keys
from swarm.identity import Identity
from swarm.testing.links import DatagramLinkEmulator, LinkSpec
from swarm.testing.sybils import JunkAnswerer, answer_with_junk

__all__ = [
    "MODEL",
    "REGIONS",
    "DHTSlice",
    "LoopLag",
    "SliceStatistics",
    "freeze_heap",
    "region_delays",
    "region_of",
]

MODEL = "sim-llama-000000000000"
REGIONS = ("eu", "us", "asia")


def freeze_heap() -> None:
    """Put what start-up built (hundreds of nodes, their tables, keys and records) out of
    the garbage collector's reach (`gc.freeze`). A simulation process holds the state of
    hundreds of nodes, and every full collection walked all of it: 10-12 % of each
    process's samples were in the collector (py-spy, 1,000 nodes), time its nodes' replies
    then waited for. A real node holds one node's state."""
    gc.collect()
    gc.freeze()


def region_of(address: tuple[str, int]) -> str:
    """The region of the node at ``address`` (by its port: the same in every process)."""
    return REGIONS[address[1] % len(REGIONS)]


def region_delays(
    seed: int, intra: tuple[float, float], inter: tuple[float, float]
) -> dict[tuple[str, str], float]:
    """One-way seconds between each pair of regions (symmetric), drawn from ``seed``."""
    rng = random.Random(f"delays-{seed}")
    delay: dict[tuple[str, str], float] = {}
    for a in REGIONS:
        for b in REGIONS:
            if (b, a) in delay:
                delay[(a, b)] = delay[(b, a)]
            else:
                lo, hi = intra if a == b else inter
                delay[(a, b)] = rng.uniform(lo, hi)
    return delay


@dataclass(frozen=True)
class SliceStatistics:
    """What a slice's nodes sent (datagrams, bytes), lost, and the junk its sybils told."""

    honest: int
    datagrams: int
    bytes: int
    lost: int
    junk_replies: int
    forged_sent: int
    signatures_verified: int = 0  # record signatures this slice's nodes verified (Ed25519)
    signatures_cached: int = 0  # record checks their `VerifiedRecords` spared
    # how late the slice's DHT event loop ran a timer (`LoopLag`), p50 and p99, ms: how
    # long each datagram these nodes received waited for a busy loop or a core
    loop_lag_p50_ms: float = 0.0
    loop_lag_p99_ms: float = 0.0

    def since(self, before: SliceStatistics) -> SliceStatistics:
        """What was counted after ``before`` (the nodes' count and the loop's lag are this
        one's)."""
        kept = ("honest", "loop_lag_p50_ms", "loop_lag_p99_ms")
        counts = {
            f.name: getattr(self, f.name) - getattr(before, f.name)
            for f in dataclasses.fields(self)
            if f.name not in kept
        }
        return SliceStatistics(**counts, **{name: getattr(self, name) for name in kept})


class LoopLag:
    """Samples how late an event loop runs a timer set ``interval`` s ahead, from the moment
    `install` runs on that loop's thread (until the loop closes). A simulation puts hundreds
    of nodes on one loop: its lookups' latency is the links' delays plus this lag at every
    hop, which a real node, alone on its machine, does not have."""

    def __init__(self, interval: float = 0.1, keep: int = 20_000) -> None:
        self.interval = interval
        self.samples: collections.deque[float] = collections.deque(maxlen=keep)

    def install(self, _kad: object = None) -> None:
        loop = asyncio.get_running_loop()

        def tick(due: float) -> None:
            self.samples.append(loop.time() - due)
            nxt = loop.time() + self.interval
            loop.call_at(nxt, tick, nxt)

        first = loop.time() + self.interval
        loop.call_at(first, tick, first)

    def percentiles_ms(self) -> tuple[float, float]:
        """(p50, p99) of the samples so far, in ms (0 without samples)."""
        values = sorted(self.samples)
        if not values:
            return 0.0, 0.0
        return (
            1000 * values[len(values) // 2],
            1000 * values[min(len(values) - 1, int(0.99 * len(values)))],
        )


class DHTSlice:
    """Some of the simulation's DHT nodes, in this process (see the module docstring)."""

    def __init__(
        self,
        *,
        seed: int,
        name: str,
        intra: tuple[float, float],
        inter: tuple[float, float],
        loss: float,
        ttl: float,
        blocks: int,
        verified_cache: int = StorageConfig.verified_cache,
    ) -> None:
        self.name = name
        self.lag = LoopLag()
        self.lag_installed = False
        self.storage = StorageConfig(verified_cache=verified_cache)
        self.seed = seed
        self.loss = loss
        self.ttl = ttl
        self.blocks = blocks
        self.delay = region_delays(seed, intra, inter)
        self.links = DatagramLinkEmulator(
            seed=zlib.crc32(f"{seed}-{name}".encode()), region_of=region_of
        )
        for (a, b), delay in self.delay.items():
            self.links.set_between(a, b, LinkSpec(delay=delay))
        self.nodes: list[DHTNode] = []
        self.stacks: list[AsyncExitStack] = []
        self.sybils: set[int] = set()
        self.liars: list[JunkAnswerer] = []

    def identity(self, index: int) -> Identity:
        return Identity.from_seed(f"sim-{self.seed}-{self.name}{index}".encode())

    async def open(self, count: int, bootstrap: Sequence[str] = (), *, parallel: int = 16) -> None:
        """Open ``count`` nodes, ``parallel`` at a time (a join is a few emulated round
        trips: one by one, hundreds take minutes); each joins through ``bootstrap`` and this
        slice's first node."""
        # dead contacts leave routing tables within half a TTL (at the default minute, nodes
        # that make few lookups hand them out, and lookups wait out their timeouts)
        timing = TimingConfig(rpc_timeout=1.0, contact_check_interval=max(2.0, self.ttl / 2))
        opened: dict[int, tuple[DHTNode, AsyncExitStack]] = {}

        async def one(index: int, peers: tuple[str, ...]) -> None:
            stack = AsyncExitStack()  # a node without a prover may be closed from any task
            node = await stack.enter_async_context(
                DHTNode.open(
                    self.identity(index),
                    DHTConfig(initial_peers=peers, timing=timing, storage=self.storage),
                    links=self.links,
                )
            )  # fmt: skip
            opened[index] = (node, stack)

        first = len(self.nodes)
        if not self.nodes and count > 0:
            await one(first, tuple(bootstrap))
            count -= 1
            self.nodes.append(opened[first][0])
            self.stacks.append(opened[first][1])
        peers = (*bootstrap, self.nodes[0].address) if self.nodes else tuple(bootstrap)
        base = len(self.nodes)
        try:
            for batch in range(0, count, parallel):
                async with trio.open_nursery() as nursery:
                    for index in range(base + batch, base + min(count, batch + parallel)):
                        nursery.start_soon(one, index, peers)
        finally:  # in order, and every node opened (even when one failed) to close later
            for index in sorted(opened):
                if index >= base:
                    self.nodes.append(opened[index][0])
                    self.stacks.append(opened[index][1])

    def joined(self) -> None:
        """Add loss once the nodes have joined (a lost join ping fails a join)."""
        for (a, b), delay in self.delay.items():
            self.links.set_between(a, b, LinkSpec(delay=delay, loss=self.loss))

    async def turn_sybils(self, candidates: Sequence[int], count: int, junk_share: float) -> None:
        """Make the first ``count`` of ``candidates`` sybils: ``junk_share`` of them answer
        junk, the rest nothing (every datagram they send is lost)."""
        keys = block_keys(MODEL, self.blocks)
        n_junk = round(junk_share * count)
        for k, index in enumerate(candidates[:count]):
            self.sybils.add(index)
            node = self.nodes[index]
            if k < n_junk:
                liar = await answer_with_junk(
                    node,
                    self.identity(index),
                    keys=keys,
                    seed=zlib.crc32(f"{self.seed}-{self.name}{index}".encode()),
                )
                self.liars.append(liar)
            else:
                self.links.silence(("127.0.0.1", node.port))

    async def watch_lag(self) -> None:
        """Start sampling the lag of this slice's DHT loop (the one all its nodes share),
        dropping what was sampled before."""
        self.lag.samples.clear()
        if not self.lag_installed and self.nodes:
            await self.nodes[0].run_on_loop(self.lag.install)
            self.lag_installed = True

    def statistics(self) -> SliceStatistics:
        sent = self.links.sent.values()
        stats = [node.statistics() for node in self.nodes]
        lag_p50, lag_p99 = self.lag.percentiles_ms()
        return SliceStatistics(
            honest=len(self.nodes) - len(self.sybils),
            datagrams=sum(n for n, _ in sent),
            bytes=sum(b for _, b in sent),
            lost=self.links.lost,
            junk_replies=sum(liar.replies for liar in self.liars),
            forged_sent=sum(liar.forged for liar in self.liars),
            signatures_verified=sum(s.signatures_verified for s in stats),
            signatures_cached=sum(s.signatures_cached for s in stats),
            loop_lag_p50_ms=lag_p50,
            loop_lag_p99_ms=lag_p99,
        )

    async def aclose(self) -> None:
        """Close every node at once (one by one takes minutes at a thousand)."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for stack in self.stacks:
                    nursery.start_soon(stack.aclose)
