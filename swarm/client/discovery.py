"""Finding servers: DHT announcements decoded into `ServerView`s, and the client's pings.

Every server announces, under ``"<model_id>/block/<i>"`` for each block ``i`` it serves, a
record whose value is a `ServerAnnouncement` (the record's subkey is its `PeerId`). The
client fetches every block key, drops records that do not decode or contradict the key they
were found under, and merges what is left into one `ServerView` per peer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import trio

from swarm.client.config import ClientConfig
from swarm.client.routing import ServerView
from swarm.dht.node import DHTNode
from swarm.dht.records import Record
from swarm.errors import DHTError, ProtocolError, SwarmError
from swarm.net.messages import InfoRequest, InfoResponse, ServerAnnouncement, message_from_wire
from swarm.net.pool import ConnectionPool
from swarm.types import PeerId, format_address, parse_address

__all__ = [
    "Discovery",
    "PingTable",
    "ServerDirectory",
    "StaticDirectory",
    "block_keys",
    "servers_from_records",
]

log = logging.getLogger(__name__)


class ServerDirectory(Protocol):
    """Where a session gets the servers it may route through, and the client's pings."""

    @property
    def pings(self) -> Mapping[PeerId, float]: ...

    async def servers(self, *, refresh: bool = False) -> Sequence[ServerView]:
        """The known servers; ``refresh`` asks the source again first."""
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


def block_keys(model_id: str, num_layers: int) -> list[str]:
    """The DHT keys a model's servers announce under, one per block."""
    return [f"{model_id}/block/{i}" for i in range(num_layers)]


def servers_from_records(
    records: Mapping[str, Mapping[PeerId, Record]], model_id: str, num_layers: int
) -> list[ServerView]:
    """One `ServerView` per announcing peer, from the records of the model's block keys.

    A record is dropped (and logged) when its value is not a valid `ServerAnnouncement`, its
    layer range does not contain the block of the key it was found under, or the range goes
    past the model's ``num_layers``. Of a peer's records the one with the highest ``seq``
    wins. Never raises for bad records.
    """
    best: dict[PeerId, tuple[int, ServerAnnouncement]] = {}
    for block, key in enumerate(block_keys(model_id, num_layers)):
        for peer, record in records.get(key, {}).items():
            announcement = _decode(record, block, num_layers)
            if announcement is None:
                continue
            held = best.get(peer)
            if held is None or record.seq > held[0]:
                best[peer] = (record.seq, announcement)
    return [_view(peer, ann) for peer, (_seq, ann) in best.items()]


def _decode(record: Record, block: int, num_layers: int) -> ServerAnnouncement | None:
    if record.value is None:
        return None
    try:
        ann: ServerAnnouncement = message_from_wire(
            dict(record.value), "announcement", expect=ServerAnnouncement
        )
    except ProtocolError as exc:
        log.info("dropping announcement of %s under %s: %s", record.peer_id, record.key, exc)
        return None
    if not ann.layer_range.start <= block < ann.layer_range.stop:
        log.info("dropping announcement of %s: %s found under block %d", record.peer_id,
                 ann.layer_range, block)  # fmt: skip
        return None
    if ann.layer_range.stop > num_layers or not math.isfinite(ann.throughput):
        log.info("dropping announcement of %s: bad range or throughput", record.peer_id)
        return None
    return ann


def _view(peer: PeerId, ann: ServerAnnouncement) -> ServerView:
    return ServerView(
        peer_id=peer,
        address=format_address(ann.host, ann.port),
        layers=ann.layer_range,
        throughput=ann.throughput,
        free_cache_tokens=ann.free_cache_tokens,
        active_sessions=ann.active_sessions,
        state=ann.state,
        next_pings={p.peer_id: p.rtt for p in ann.next_pings},
        dtype=ann.dtype,
    )


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


async def ping_server(pool: ConnectionPool, server: ServerView, timeout: float) -> float:
    """RTT of one ``info`` call (the channel is dialed first, outside the measurement).

    Raises `SwarmError` subclasses: what dialing or the call raise, `DeadlineExceeded`.
    """
    host, port = parse_address(server.address)
    with trio.fail_after(timeout):
        conn = await pool.get(host, port, server.peer_id)
    start = trio.current_time()
    await conn.call("info", InfoRequest(), InfoResponse, timeout=timeout)
    return trio.current_time() - start


class Discovery:
    """The servers of one model, from the DHT, with the client's pings to them.

    `refresh` fetches every block key (bounded by ``config.request_timeout``) and pings up to
    ``config.ping_max_servers`` servers, ``config.ping_concurrency`` at a time; a server that
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
        self._pings = PingTable(config.ping_ema)
        self._servers: list[ServerView] = []
        self.refreshes = 0

    @property
    def pings(self) -> Mapping[PeerId, float]:
        return self._pings.rtts

    async def servers(self, *, refresh: bool = False) -> Sequence[ServerView]:
        if refresh or self.refreshes == 0:
            await self.refresh()
        return list(self._servers)

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
        self._servers = servers_from_records(records, self.model_id, self.num_layers)
        self.refreshes += 1
        await self.measure_pings()
        return list(self._servers)

    async def measure_pings(self) -> None:
        """Ping the online servers (at most ``ping_max_servers``) concurrently."""
        targets = [s for s in self._servers if s.state == "online"][: self.config.ping_max_servers]
        limit = trio.Semaphore(self.config.ping_concurrency)

        async def one(server: ServerView) -> None:
            async with limit:
                try:
                    rtt = await ping_server(self.pool, server, self.config.ping_timeout)
                except (SwarmError, trio.TooSlowError) as exc:
                    log.info("ping to %s failed: %s", server.peer_id, exc)
                    return
                self._pings.update(server.peer_id, rtt)

        async with trio.open_nursery() as nursery:
            for server in targets:
                nursery.start_soon(one, server)
