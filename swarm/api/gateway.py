"""`Gateway`: what every request of `swarm api` shares.

One `AsyncRemoteModel` (DHT node, connection pool, route knowledge, bans, reputation), the
admission slots, the receipt store, the metrics, and the latest view of the servers, which
`Gateway.run_background` keeps fresh (a DHT lookup every ``refresh_s``) together with
canary probes (known answers computed from the gateway's own copy of the checkpoint, one
layer at a time). Only servers whose records are proven are probed (they answered the
client's ping as their `PeerId` at their address), and at most `NEW_CANARY_RANGES` new
ranges are computed per round, so forged records can neither steer the gateway's dials nor
its CPU. Routes, ``/health`` and the status page read that view.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from swarm.api.admission import Admission
from swarm.api.config import GatewayConfig
from swarm.api.http import ConnectionGate
from swarm.api.jobs import ModelFacts, longest_token
from swarm.api.metrics import GatewayMetrics
from swarm.api.receipts import ReceiptStore
from swarm.client.model import AsyncRemoteModel
from swarm.directory import ServerView, missing_blocks
from swarm.errors import ConfigError, SwarmError
from swarm.shards import ChatTemplate, model_id
from swarm.types import LayerRange, PeerId, ServerState, parse_address
from swarm.verify.health import Canary, ServerHealth, make_canaries, probe_safely

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

_KEEP_LATENCIES = 64
NEW_CANARY_RANGES = 2  # ranges whose answers are computed per probe round, at most
T = TypeVar("T")


@dataclass
class _Canaries:
    """Canary answers per range and what each server returned so far."""

    by_range: dict[LayerRange, Canary] = field(default_factory=dict)
    health: dict[PeerId, ServerHealth] = field(default_factory=dict)


class Gateway:
    """The shared state of the gateway; build it with `Gateway.create`."""

    def __init__(self, model: AsyncRemoteModel, config: GatewayConfig, facts: ModelFacts) -> None:
        self.model = model
        self.config = config
        self.facts = facts
        self.started = time.time()
        self.admission = Admission(
            config.max_concurrent, config.queue, config.retry_after_s, config.queue_timeout_s
        )
        self.receipts = ReceiptStore(config.receipts_keep, config.receipts_ttl_s)
        self.connections = ConnectionGate(config.max_connections, config.max_connections_per_host)
        self._cpu = trio.CapacityLimiter(config.prepare_threads)
        self.metrics = GatewayMetrics(
            running=lambda: self.admission.statistics().running,
            queued=lambda: self.admission.statistics().queued,
            banned=lambda: len(self.banned()),
            clock=time.monotonic,
        )
        connections = self.connections.statistics
        self.metrics.gauge(
            "swarm_api_connections", "Open HTTP connections", lambda: connections().open
        )
        self.metrics.gauge(
            "swarm_api_connections_refused",
            "Connections refused (caps)",
            lambda: connections().refused,
        )
        self.metrics.gauge(
            "swarm_api_send_timeouts",
            "Connections closed: client did not read",
            lambda: connections().send_timeouts,
        )
        self.metrics.gauge(
            "swarm_api_header_timeouts",
            "Connections closed: request head too slow",
            lambda: connections().header_timeouts,
        )
        self.metrics.gauge(
            "swarm_api_connections_evicted",
            "Connections closed to make room for a host holding fewer",
            lambda: connections().evicted,
        )
        self.servers: list[ServerView] = []
        self.refreshed_at: float | None = None  # time.time() of the last good refresh
        self.refresh_error: str | None = None
        self._canaries = _Canaries()

    @classmethod
    def create(
        cls, model: AsyncRemoteModel, config: GatewayConfig, template: ChatTemplate | None
    ) -> Gateway:
        """The gateway of ``model``; ``template`` renders chats (None: chats get 400).

        Raises `ConfigError` when the checkpoint has no tokenizer (the API speaks text).
        """
        if model.tokenizer is None:
            raise ConfigError(f"{model.path} has no tokenizer.json: the gateway needs one")
        positions = model.model_config.max_position_embeddings
        facts = ModelFacts(
            name=config.model_name or _default_name(model.path),
            model_id=model_id(model.path),
            tokenizer=model.tokenizer,
            template=template,
            vocab_size=model.model_config.vocab_size,
            max_length=config.max_length or positions,
            default_max_tokens=config.default_max_tokens,
            default_verify=config.verify,
            max_redundancy=config.max_redundancy,
            token_chars=longest_token(model.tokenizer),
        )
        return cls(model, config, facts)

    async def prepare(self, work: Callable[[], T]) -> T:
        """Run CPU work of a request (rendering, tokenizing) in one of ``prepare_threads``
        worker threads, never on the event loop; waits for a free thread."""
        return await trio.to_thread.run_sync(work, limiter=self._cpu)

    @property
    def num_layers(self) -> int:
        return self.model.model_config.num_hidden_layers

    def banned(self) -> set[PeerId]:
        """Peers the client routes around now: failures, and proven or suspected lies."""
        reputation = self.model.reputation
        return self.model.bans.banned() | (reputation.banned() if reputation else set())

    def health(self, peer: PeerId) -> ServerHealth | None:
        """Canary results of one server so far (None: not probed yet)."""
        return self._canaries.health.get(peer)

    def missing(self) -> list[int]:
        return missing_blocks(self.servers, self.num_layers)

    async def refresh(self) -> None:
        """Ask the DHT for the servers again (errors are kept for the status page)."""
        try:
            self.servers = list(await self.model.directory.servers(refresh=True))
            self.refreshed_at, self.refresh_error = time.time(), None
        except SwarmError as exc:
            self.refresh_error = str(exc)
            log.warning("refreshing the servers failed: %s", exc)

    async def run_background(self, canary_s: float = 30.0) -> None:
        """Refresh the servers every ``refresh_s`` and probe them with canaries every
        ``canary_s`` (0: never). Runs until cancelled."""
        next_canary = trio.current_time()
        while True:
            await self.refresh()
            if canary_s > 0 and trio.current_time() >= next_canary:
                await self.probe_servers()
                next_canary = trio.current_time() + canary_s
            await trio.sleep(self.config.refresh_s)

    async def probe_servers(self) -> None:
        """One canary per online server whose record is proven (answers computed once per
        range, in a thread, at most `NEW_CANARY_RANGES` new ones per call)."""
        directory = self.model.directory
        online = [s for s in self.servers if s.state == ServerState.ONLINE and directory.reached(s)]
        canaries = self._canaries
        announced = {s.layers for s in online}
        for stale in set(canaries.by_range) - announced:
            del canaries.by_range[stale]
        known = {s.peer_id for s in self.servers}
        for gone in set(canaries.health) - known:
            del canaries.health[gone]
        missing = sorted(announced - set(canaries.by_range))[:NEW_CANARY_RANGES]
        if missing:
            try:
                made = await trio.to_thread.run_sync(make_canaries, Path(self.model.path), missing)
            except (SwarmError, OSError) as exc:
                log.warning("could not compute canaries: %s", exc)
                return
            canaries.by_range.update(made)
        timeout = self.model.config.request_timeout

        async def one(server: ServerView) -> None:
            host, port = parse_address(server.address)

            async def connect() -> object:
                return await self.model.pool.get(host, port, server.peer_id)

            result = await probe_safely(
                connect, canaries.by_range[server.layers], server.numerics, timeout
            )
            entry = canaries.health.setdefault(
                server.peer_id, ServerHealth(server.peer_id, server.layers)
            )
            entry.add(result)
            del entry.latencies[:-_KEEP_LATENCIES]

        async with trio.open_nursery() as nursery:
            for server in online:
                if server.layers in canaries.by_range:
                    nursery.start_soon(one, server)


def _default_name(path: Path) -> str:
    name = path.name
    for suffix in (".gguf",):
        name = name.removesuffix(suffix)
    return name
