"""`DHTNode`: the trio face of one DHT node.

::

    async with DHTNode.open(identity, DHTConfig(initial_peers=("10.0.0.1:31337",))) as node:
        await node.announce("model/block/3", {"addr": "10.0.0.2:4000"}, ttl=60)
        records = await node.get("model/block/3")   # {PeerId: Record}

Records are signed by ``identity`` and merged by announcing peer; see `swarm.dht.records`.
Announcers re-announce every TTL/2 (the server does); records are never extended by anyone
else. All kademlia state lives on the shared DHT loop thread (`swarm.dht.runner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from swarm.dht.config import DHTConfig
from swarm.dht.kademlia_node import KademliaNode
from swarm.dht.links import DatagramLinks
from swarm.dht.proofs import ProofCache, RecordProver, run_proofs
from swarm.dht.protocol import key_digest
from swarm.dht.records import DropReason, Record, check_record, make_record
from swarm.dht.runner import AsyncioRunner, shared_runner
from swarm.dht.stats import DHTStatistics, StatsCounter
from swarm.errors import DHTError, RecordError
from swarm.identity import Identity
from swarm.types import PeerId, parse_address

__all__ = ["DHTNode"]

_CLOSE_TIMEOUT_S = 5.0
_PROOF_QUEUE = 256  # claims in flight between the threads (the fair queue is behind it)


class DHTNode:
    """A running DHT node; build it with `DHTNode.open`."""

    def __init__(
        self, identity: Identity, config: DHTConfig, runner: AsyncioRunner, kad: KademliaNode
    ) -> None:
        self.identity = identity
        self.config = config
        self._runner = runner
        self._kad = kad
        self._stats: StatsCounter = kad.stats
        self._announce_limit = trio.Semaphore(config.kademlia.announce_concurrency)
        self._seq: dict[str, int] = {}
        self._last_expiry: dict[str, float] = {}
        self.port = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        identity: Identity,
        config: DHTConfig,
        *,
        prover: RecordProver | None = None,
        links: DatagramLinks | None = None,
    ) -> AsyncIterator[DHTNode]:
        """Listen on ``config.host:config.port`` and join through ``config.initial_peers``.

        ``prover``, if given, lets this node (as a storing node) keep records whose signer
        proved its claim before unproven ones (`swarm.dht.proofs`); its proofs run in a task
        of this context, rate-limited by ``config.proof_*``. ``links`` is a test seam: every
        datagram this node sends goes through it (`swarm.dht.links`; link emulation).

        Raises `DHTError` if the socket cannot be bound, an initial peer's host cannot be
        resolved, or none of the initial peers answered within ``config.timing.bootstrap_timeout``.
        A full node then spends up to ``config.timing.join_crawl_timeout`` looking up its own
        neighbourhood (never an error: a slow crawl only leaves it fewer contacts at first);
        a client-only node (``config.client_only``) skips that step.
        """
        with shared_runner() as runner:
            stats = StatsCounter()
            proofs = ProofCache(prover, config, stats) if prover is not None else None
            kad = KademliaNode(config, stats, proofs, links)
            node = cls(identity, config, runner, kad)
            try:
                if prover is None or proofs is None:
                    await node._start()
                    yield node
                else:  # (only then a task: a node without one may be closed out of order)
                    claims = node._connect_proofs(proofs)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(node._prove, prover, claims)
                        await node._start()
                        yield node
                        nursery.cancel_scope.cancel()
            finally:
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    scope.shield = True
                    await runner.run(kad.aclose)

    def _connect_proofs(
        self, proofs: ProofCache
    ) -> trio.MemoryReceiveChannel[tuple[Hashable, str]]:
        """Route the claims the DHT loop thread asks for into a channel (trio thread)."""
        send, receive = trio.open_memory_channel[tuple[Hashable, str]](_PROOF_QUEUE)
        token = trio.lowlevel.current_trio_token()

        def offer(claim: Hashable, group: str) -> None:  # trio thread
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                send.send_nowait((claim, group))  # a full channel drops it: asked again later

        def submit(claim: Hashable, group: str) -> None:  # DHT loop thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(offer, claim, group)

        proofs.submit = submit
        return receive

    async def _prove(
        self, prover: RecordProver, claims: trio.MemoryReceiveChannel[tuple[Hashable, str]]
    ) -> None:
        """Prove claims and hand the verdicts back to storage (until cancelled)."""

        async def settle(claim: Hashable, ok: bool) -> None:
            await self._runner.run(_async(lambda: self._kad.storage.settle(claim, ok)))

        await run_proofs(prover, self.config, claims, settle, self._kad.stats)

    async def _start(self) -> None:
        try:
            self.port = await self._runner.run(
                lambda: self._kad.listen(self.config.port, self.config.host)
            )
        except OSError as exc:
            where = f"{self.config.host}:{self.config.port}"
            raise DHTError(f"cannot listen on {where}: {exc}") from exc
        if not self.config.initial_peers:
            return
        addrs = await _resolve(self.config.initial_peers)
        answered = 0
        with trio.move_on_after(self.config.timing.bootstrap_timeout):
            answered = await self._runner.run(lambda: self._kad.reach(addrs))
        if not answered:
            raise DHTError(
                "none of the initial DHT peers answered within "
                f"{self.config.timing.bootstrap_timeout} s: " + ", ".join(self.config.initial_peers)
            )
        if not self.config.client_only:
            with trio.move_on_after(self.config.timing.join_crawl_timeout):
                await self._runner.run(self._kad.find_neighbourhood)

    @property
    def address(self) -> str:
        """``"host:port"`` other nodes can use as an initial peer."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    async def announce(self, key: str, value: Mapping[str, Any], ttl: float) -> int:
        """Sign ``value`` and store it under ``key`` on the nodes closest to it, expiring
        ``ttl`` seconds from now. Returns how many remote nodes acknowledged it (0 when alone).

        Raises `RecordError` if the value is not a msgpack-able ``{str: ...}`` map, the signed
        record exceeds ``config.storage.max_record_bytes``, or ``ttl`` is not in (0, ``max_ttl``].
        """
        if not 0 < ttl <= self.config.storage.max_ttl:
            raise RecordError(
                f"ttl {ttl} for {key!r} must be in (0, {self.config.storage.max_ttl}]"
            )
        expires_at = time.time() + ttl
        acks = await self._publish(key, value, expires_at)
        self._last_expiry[key] = expires_at
        return acks

    async def retract(self, key: str) -> int:
        """Replace our record under ``key`` with a signed tombstone (it expires when the record
        would have); readers stop seeing us there. No-op (returns 0) if we never announced it."""
        expires_at = self._last_expiry.pop(key, None)
        if expires_at is None or expires_at <= time.time():
            return 0
        return await self._publish(key, None, expires_at)

    async def _publish(self, key: str, value: Mapping[str, Any] | None, expires_at: float) -> int:
        seq = max(time.time_ns(), self._seq.get(key, 0) + 1)
        record = make_record(
            self.identity, key, value, expires_at, seq, self.config.storage.max_record_bytes
        )
        self._seq[key] = seq
        dkey = key_digest(key)
        self._stats.event("announces")

        async def store() -> int:
            async with self._runner.store_slots:
                return await self._kad.store(dkey, record.encoded)

        async with self._announce_limit:
            return await self._runner.run(store)

    async def get(self, key: str) -> dict[PeerId, Record]:
        """The live records under ``key``, one per announcing peer (the highest ``seq``),
        merged from our copy and up to ``config.kademlia.get_quorum`` replicas. Retracted and
        expired records are left out; forged ones are dropped and counted in `statistics`."""
        self._stats.event("gets")
        checked: dict[bytes, Record | DropReason] = {}
        cfg = self.config

        def check(blob: bytes) -> Record | DropReason:
            """Verify a blob once per get (replicas return the same bytes)."""
            result = checked.get(blob)
            if result is None:
                result = checked[blob] = check_record(
                    blob,
                    key,
                    now=time.time(),
                    max_bytes=cfg.storage.max_record_bytes,
                    max_ttl=cfg.storage.max_ttl,
                    clock_skew=cfg.storage.clock_skew,
                    verified=self._kad.verified,
                )
            return result

        blobs = await self._runner.run(lambda: self._kad.fetch(key_digest(key), check))
        return self._merge(blobs, check)

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[PeerId, Record]]:
        """`get` for several keys concurrently."""
        results: dict[str, dict[PeerId, Record]] = {}

        async def one(key: str) -> None:
            results[key] = await self.get(key)

        async with trio.open_nursery() as nursery:
            for key in dict.fromkeys(keys):
                nursery.start_soon(one, key)
        return results

    def _merge(
        self, blobs: list[bytes], check: Callable[[bytes], Record | DropReason]
    ) -> dict[PeerId, Record]:
        best: dict[PeerId, Record] = {}
        for blob in dict.fromkeys(blobs):  # replicas return the same bytes: count once
            result = check(blob)
            if isinstance(result, DropReason):
                self._stats.drop(result)
                continue
            held = best.get(result.peer_id)
            if held is None or result.seq > held.seq:
                best[result.peer_id] = result
        return {pid: r for pid, r in best.items() if not r.retracted}

    def statistics(self) -> DHTStatistics:
        """Counters of this node: records dropped by reason, records held, routing table,
        signatures verified and checks spared by the node's `VerifiedRecords`."""
        verified, snapshot = self._kad.verified, self._stats.snapshot()
        if verified is None:
            return snapshot
        return dataclasses.replace(
            snapshot, signatures_verified=verified.verified, signatures_cached=verified.hits
        )

    async def routing_addresses(self) -> list[tuple[str, int]]:
        """(ip, port) of the contacts in our routing table."""
        return await self._runner.run(_async(self._kad.routing_addresses))

    async def run_on_loop(self, fn: Any) -> Any:
        """Run ``fn(kademlia_node)`` (a plain function) on the DHT loop (tests, diagnostics)."""
        return await self._runner.run(_async(lambda: fn(self._kad)))


def _async(fn: Any) -> Any:
    async def call() -> Any:
        return fn()

    return call


async def _resolve(peers: tuple[str, ...]) -> list[tuple[str, int]]:
    """Resolve ``"host:port"`` strings to (ip, port). Raises `DHTError` if a host is unknown."""
    addrs = []
    for peer in peers:
        host, port = parse_address(peer)
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
        except OSError as exc:
            raise DHTError(f"cannot resolve DHT peer {peer!r}: {exc}") from exc
        addrs.append((str(infos[0][4][0]), port))
    return addrs
