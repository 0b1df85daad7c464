"""Finding servers: DHT announcements decoded into `ServerView`s, and the client's pings.

The client fetches every block key of the model and turns the records into one `ServerView`
per peer with `swarm.directory.servers_from_records` (the same strict decoder the servers
use). Where servers are relayed, the relays' own records under `relay_key` say how busy
each relay is: a relayed server is dialed through its least loaded relay, and the planner
counts that relay's load (`swarm.directory.with_relay_loads`). With ``config.direct``, a
relayed server that answered its ping is offered a direct connection (`ConnectionPool.try_upgrade`:
the punch runs beside the relayed channel and the refresh waits ``direct.wait`` at most), and is
reported `ServerView.upgraded` while the channel to it is direct.

A record is only a claim: anyone may sign one naming any address. The client's ping proves
it (the handshake succeeds only as the record's `PeerId` at its address: `Discovery.reached`),
and pings are rationed so that forged records cannot make the client a dialer of someone
else's address (`PingSchedule`): a server that answered is pinged again every
``pings.interval_s``, one that did not after a doubling backoff, and per refresh at most
``pings.new_per_host`` never-reached records per host are dialed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Protocol

import trio

from swarm.client.config import ClientConfig
from swarm.dht.config import DHTConfig
from swarm.dht.node import DHTNode
from swarm.directory import (
    ServerView,
    block_keys,
    mismatch_hint,
    other_model_ids,
    ping_server,
    relay_key,
    relays_from_records,
    servers_from_records,
    with_relay_loads,
)
from swarm.errors import ConfigError, DHTError, SwarmError
from swarm.net.pool import ConnectionPool, open_connection_pool
from swarm.net.transport import Transport
from swarm.types import PeerId, ServerState, parse_address

__all__ = [
    "Discovery",
    "PingSchedule",
    "PingTable",
    "ServerDirectory",
    "StaticDirectory",
    "join_as_client",
    "open_client_pool",
]

log = logging.getLogger(__name__)


def open_client_pool(
    config: ClientConfig, transport: Transport | None = None
) -> AbstractAsyncContextManager[ConnectionPool]:
    """The client's connection pool: its identity, swarm key and network config."""
    return open_connection_pool(
        config.identity, transport=transport, swarm_key=config.swarm_key, config=config.net
    )


@asynccontextmanager
async def join_as_client(
    config: ClientConfig, pool: ConnectionPool | None = None, transport: Transport | None = None
) -> AsyncIterator[tuple[ConnectionPool, DHTNode]]:
    """Join the swarm as a client (the one place that says how): the client's pool (``pool``,
    or one opened here on ``transport``) and a client-only DHT node, which asks and is added
    to nobody's routing table, so clients that come and go do not wear the DHT down.

    Raises `ConfigError` without ``config.initial_peers``, `DHTError` if the DHT cannot be
    joined.
    """
    if not config.initial_peers:
        raise ConfigError("no initial peers: give the host:port of a DHT node")
    dht_config = DHTConfig(
        initial_peers=config.initial_peers, swarm_key=config.swarm_key, client_only=True
    )
    async with AsyncExitStack() as stack:
        if pool is None:
            pool = await stack.enter_async_context(open_client_pool(config, transport))
        dht = await stack.enter_async_context(DHTNode.open(config.identity, dht_config))
        yield pool, dht


class ServerDirectory(Protocol):
    """Where a session gets the servers it may route through, and the client's pings."""

    @property
    def pings(self) -> Mapping[PeerId, float]: ...

    async def servers(self, *, refresh: bool = False) -> Sequence[ServerView]:
        """The known servers; ``refresh`` asks the source again first."""
        ...

    def absence_hint(self) -> str:
        """Why no server may be found, if the source knows ("": nothing to say)."""
        ...

    def reached(self, server: ServerView) -> bool:
        """Whether ``server`` proved its record (answered as its `PeerId` at its address)."""
        ...

    def unreachable(self, server: ServerView) -> bool:
        """Whether the last ping to ``server`` failed (a crashed server's record outlives
        it until its TTL runs out)."""
        ...


class StaticDirectory:
    """A fixed list of servers (tests, or a client told its servers directly)."""

    def __init__(
        self, servers: Sequence[ServerView], pings: Mapping[PeerId, float] | None = None
    ) -> None:
        self._servers = list(servers)
        self.pings: Mapping[PeerId, float] = dict(pings or {})

    async def servers(self, *, refresh: bool = False) -> Sequence[ServerView]:
        return list(self._servers)

    def absence_hint(self) -> str:
        return ""

    def reached(self, server: ServerView) -> bool:
        return True  # a list given directly is trusted

    def unreachable(self, server: ServerView) -> bool:
        return False


class PingTable:
    """The client's round-trip times to servers: an exponential moving average per peer."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.rtts: dict[PeerId, float] = {}

    def update(self, peer: PeerId, rtt: float) -> float:
        """Fold one sample in; returns the new average."""
        old = self.rtts.get(peer)
        new = rtt if old is None else (1 - self.weight) * old + self.weight * rtt
        self.rtts[peer] = new
        return new


class PingSchedule:
    """When each announced (peer, address) may be dialed again, and which were reached."""

    def __init__(self, interval_s: float, new_per_host: int, max_backoff: float = 20.0) -> None:
        self.interval_s = interval_s
        self.new_per_host = new_per_host
        self.max_backoff = max_backoff
        self._next: dict[tuple[PeerId, str], float] = {}  # earliest next dial
        self._failures: dict[tuple[PeerId, str], int] = {}
        self._reached: set[tuple[PeerId, str]] = set()

    def reached(self, server: ServerView) -> bool:
        """Whether ``server`` answered as its `PeerId` at its announced address."""
        return (server.peer_id, server.address) in self._reached

    def due(self, servers: Sequence[ServerView], now: float, limit: int) -> list[ServerView]:
        """The servers to ping now: reached ones first, at most ``limit``, at most
        ``new_per_host`` never-reached ones per host."""
        fresh: dict[str, int] = {}
        out = []
        ordered = sorted(servers, key=lambda s: not self.reached(s))
        for server in ordered:
            key = (server.peer_id, server.address)
            if self._next.get(key, now) > now:
                continue
            if key not in self._reached:
                host = server.address.rsplit(":", 1)[0]
                if fresh.get(host, 0) >= self.new_per_host:
                    continue
                fresh[host] = fresh.get(host, 0) + 1
            out.append(server)
            if len(out) >= limit:
                break
        return out

    def unreachable(self, server: ServerView) -> bool:
        """Whether the last ping to ``server`` at its announced address failed."""
        key = (server.peer_id, server.address)
        return key not in self._reached and self._failures.get(key, 0) > 0

    def answered(self, server: ServerView, now: float) -> None:
        key = (server.peer_id, server.address)
        self._reached.add(key)
        self._failures.pop(key, None)
        self._next[key] = now + self.interval_s

    def failed(self, server: ServerView, now: float) -> None:
        key = (server.peer_id, server.address)
        self._reached.discard(key)
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        backoff = min(2.0 ** (failures - 1), self.max_backoff)
        self._next[key] = now + self.interval_s * backoff

    def forget_except(self, servers: Sequence[ServerView]) -> None:
        """Drop what is known of records no longer announced (bounded memory)."""
        keep = {(s.peer_id, s.address) for s in servers}
        for table in (self._next, self._failures):
            for key in [k for k in table if k not in keep]:
                del table[key]
        self._reached &= keep


class Discovery:
    """The servers of one model, from the DHT, with the client's pings to them.

    `refresh` fetches every block key (bounded by ``config.request_timeout``) and pings up to
    ``config.pings.max_servers`` servers, ``config.pings.concurrency`` at a time; a server that
    does not answer its ping is only left without a ping (the planner then assumes a default).
    """

    def __init__(
        self,
        dht: DHTNode,
        pool: ConnectionPool,
        model_id: str,
        num_layers: int,
        config: ClientConfig,
    ) -> None:
        self.dht = dht
        self.pool = pool
        self.model_id = model_id
        self.num_layers = num_layers
        self.config = config
        self._pings = PingTable(config.pings.ema)
        self._schedule = PingSchedule(config.pings.interval_s, config.pings.new_per_host)
        self._servers: list[ServerView] = []
        self.refreshes = 0
        self._hint = ""

    @property
    def pings(self) -> Mapping[PeerId, float]:
        return self._pings.rtts

    async def servers(self, *, refresh: bool = False) -> Sequence[ServerView]:
        if refresh or self.refreshes == 0:
            await self.refresh()
        return [self._as_reached(s) for s in self._servers]

    def _as_reached(self, server: ServerView) -> ServerView:
        """``server``, marked `ServerView.upgraded` while our channel to it is direct."""
        upgraded = bool(server.relays) and self.pool.is_direct(server.peer_id)
        return replace(server, upgraded=True) if upgraded else server

    async def refresh(self) -> list[ServerView]:
        """Fetch the announcements again and ping the servers.

        Raises `DHTError` if the DHT lookup does not finish within ``request_timeout``.
        """
        keys = block_keys(self.model_id, self.num_layers)
        with trio.move_on_after(self.config.request_timeout) as scope:
            records = await self.dht.get_many(keys)
        if scope.cancelled_caught:
            limit = self.config.request_timeout
            raise DHTError(f"DHT lookup of {self.model_id} took over {limit} s")
        found = servers_from_records(records, self.model_id, self.num_layers)
        if any(s.relays for s in found):  # relayed servers: through which relay, how busy
            with trio.move_on_after(self.config.request_timeout):
                relays = relays_from_records(await self.dht.get(relay_key()))
                found = with_relay_loads(found, relays)
        wanted = self.config.quant
        self._servers = [s for s in found if wanted is None or s.quantization == wanted]
        self.refreshes += 1
        if found and not self._servers:
            kinds = ", ".join(sorted({s.quantization for s in found}))
            self._hint = f"no server keeps its weights as {wanted} (they serve: {kinds})"
        elif not self._servers:  # our id has no server: is there a copy of other weights?
            others = await other_model_ids(self.dht, self.model_id)
            self._hint = mismatch_hint(self.model_id, others)
        else:
            self._hint = ""
        await self.measure_pings()
        return [self._as_reached(s) for s in self._servers]

    def absence_hint(self) -> str:
        """Set when the last refresh found no server of our id but servers of another id of
        the same model family (our local weights differ from theirs)."""
        return self._hint

    def reached(self, server: ServerView) -> bool:
        """Whether ``server``'s record is proven: it answered a ping as its `PeerId` at its
        announced address (and has not failed one since)."""
        return self._schedule.reached(server)

    def unreachable(self, server: ServerView) -> bool:
        """Whether the last ping to ``server`` failed (and none answered since)."""
        return self._schedule.unreachable(server)

    async def measure_pings(self) -> None:
        """Ping the online servers that are due (`PingSchedule`; at most
        ``pings.max_servers``), ``pings.concurrency`` at a time."""
        online = [s for s in self._servers if s.state == ServerState.ONLINE]
        schedule = self._schedule
        schedule.forget_except(online)
        targets = schedule.due(online, trio.current_time(), self.config.pings.max_servers)
        limit = trio.Semaphore(self.config.pings.concurrency)

        async def one(server: ServerView) -> None:
            async with limit:
                try:
                    rtt = await ping_server(self.pool, server, self.config.pings.timeout)
                except (SwarmError, trio.TooSlowError) as exc:
                    log.info("ping to %s failed: %s", server.peer_id, exc)
                    schedule.failed(server, trio.current_time())
                    return
                schedule.answered(server, trio.current_time())
                self._pings.update(server.peer_id, rtt)
                punch = self.config.direct
                if punch is not None and server.relays and not server.upgraded:
                    relay_host = parse_address(server.address)[0]
                    await self.pool.try_upgrade(server.peer_id, towards=relay_host, punch=punch)

        async with trio.open_nursery() as nursery:
            for server in targets:
                nursery.start_soon(one, server)
