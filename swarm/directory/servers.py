"""Server announcements: the one strict decoder, and the `ServerView` built from them.

Every server announces, under `block_key` for each block it serves, a record whose value is
a `ServerAnnouncement` (the record's subkey is its `PeerId`). Clients (route planning) and
servers (``--layers auto``, next-hop pings) read them through this module only, so both sides
drop exactly the same records: a value that does not decode, a range that does not cover the
block of the key it was found under or goes past the model, a throughput that is not a
finite number in ``[0, MAX_THROUGHPUT]``, a cache or session count past its bound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from swarm.dht.records import Record
from swarm.directory.keys import block_key
from swarm.directory.relays import RelayView
from swarm.errors import ProtocolError
from swarm.net.messages import RangeMove, RelayHop, ServerAnnouncement, message_from_wire
from swarm.net.surface import call_info
from swarm.types import (
    LayerRange,
    PeerId,
    Reachability,
    ServerState,
    format_address,
    parse_address,
)

if TYPE_CHECKING:
    from swarm.net.pool import ConnectionPool

__all__ = [
    "MAX_CACHE_TOKENS",
    "MAX_SESSIONS",
    "MAX_THROUGHPUT",
    "PROBE_SLACK",
    "ServerView",
    "counted_throughput",
    "decode_announcement",
    "delivered_by_peers",
    "dial_address",
    "servers_from_records",
    "with_relay_loads",
]

log = logging.getLogger(__name__)

MAX_THROUGHPUT = 1e7  # tokens/s through a span; far above any real server
MAX_CACHE_TOKENS = 1 << 34
MAX_SESSIONS = 1 << 20
# A peer's probe (`PingEntry.tps`) is one timed one-token call, which carries fixed costs (a
# thread hand-off, serialization) that a server's own in-process measurement does not: a
# server counts for at most this many times what its peers measured, so only a clear
# shortfall discounts it (`counted_throughput`).
PROBE_SLACK = 2.0
RELAY_LOAD_MARGIN = 0.1  # a relayed server's other relay is used when this much less loaded


@dataclass(frozen=True)
class ServerView:
    """What a peer knows about one server (from its announcement) when it plans."""

    peer_id: PeerId
    address: str
    layers: LayerRange
    throughput: float  # tokens per second through the whole span
    free_cache_tokens: int
    active_sessions: int = 0
    state: ServerState = ServerState.ONLINE
    next_pings: Mapping[PeerId, float] = field(default_factory=dict)  # RTT in seconds
    # tokens/s that servers of the block after its range delivered when it probed them
    next_delivered: Mapping[PeerId, float] = field(default_factory=dict)
    dtype: str = "float32"  # what the server computes in
    reachability: Reachability = Reachability.UNKNOWN
    relays: tuple[RelayHop, ...] = ()  # non-empty: dialed through the first (`address`)
    direct_address: str = ""  # the address it listens on (= `address` unless relayed)
    moving_to: LayerRange | None = None  # rebalancing: the range it is loading to move to
    last_move: RangeMove | None = None  # its latest move (who moved where, and why)
    quantization: str = "none"  # how its weights are kept: none, int8, int4
    room_tokens: int = 0  # free plus reclaimable cache for a newcomer (see ServerAnnouncement)
    # the share of its circuits the relay it is dialed through has in use, from that relay's
    # own announcement (`RelayView.load`); 0 when direct or when the relay's load is unknown
    relay_load: float = 0.0
    # relayed, but this client's channel to it was upgraded to a direct connection
    # (`swarm.net.pool.ConnectionPool.upgrade`): it costs and reports as direct
    upgraded: bool = False

    @property
    def numerics(self) -> str:
        """What canaries compare this server's answers by (`swarm.verify.compare`): its
        dtype, plus its quantization when it has one (``"float32+int4"``)."""
        return self.dtype if self.quantization == "none" else f"{self.dtype}+{self.quantization}"

    @property
    def newcomer_tokens(self) -> int:
        """The most cache a new session here can get: free, or reclaimable from peers
        beyond their shares (a server whose room is only borrowed still takes sessions)."""
        return max(self.free_cache_tokens, self.room_tokens)

    @property
    def path(self) -> str:
        """``"relayed"`` when dials go through a relay (and no direct connection was made
        to it), else ``"direct"``."""
        return "relayed" if self.relays and not self.upgraded else "direct"


def dial_address(ann: ServerAnnouncement) -> tuple[str, int]:
    """Where to dial the server that made ``ann``: its first relay when it announces
    relays (it cannot be dialed itself), else its own address. The dialer's routed hello
    names the server's `PeerId`, so the relay knows whom to splice it to."""
    if ann.relays:
        return ann.relays[0].host, ann.relays[0].port
    return ann.host, ann.port


def decode_announcement(value: object, block: int, num_layers: int | None) -> ServerAnnouncement:
    """The announcement in a record value found under block ``block`` of a model with
    ``num_layers`` layers (None where the model's size is not known, as for the DHT's
    prover: then the range is checked against the block only). Raises `ProtocolError`
    naming what is wrong."""
    ann: ServerAnnouncement = message_from_wire(value, "announcement", expect=ServerAnnouncement)
    if block not in ann.layer_range:
        raise ProtocolError(f"announcement.layer_range {ann.layer_range} misses block {block}")
    if num_layers is not None and ann.layer_range.stop > num_layers:
        raise ProtocolError(
            f"announcement.layer_range {ann.layer_range} goes past the model's {num_layers}"
        )
    if not (math.isfinite(ann.throughput) and 0.0 <= ann.throughput <= MAX_THROUGHPUT):
        raise ProtocolError(f"announcement.throughput {ann.throughput!r} is out of range")
    moves = [("moving_to", ann.moving_to)]
    if ann.last_move is not None:
        moves += [("last_move.from_range", ann.last_move.from_range)]
        moves += [("last_move.to_range", ann.last_move.to_range)]
    for name, layers in moves:
        if layers is not None and num_layers is not None and layers.stop > num_layers:
            raise ProtocolError(f"announcement.{name} {layers} goes past the model's {num_layers}")
    if ann.free_cache_tokens > MAX_CACHE_TOKENS:
        raise ProtocolError("announcement.free_cache_tokens is out of range")
    if ann.room_tokens > MAX_CACHE_TOKENS:
        raise ProtocolError("announcement.room_tokens is out of range")
    if ann.active_sessions > MAX_SESSIONS:
        raise ProtocolError("announcement.active_sessions is out of range")
    if any(not math.isfinite(p.rtt) for p in ann.next_pings):
        raise ProtocolError("announcement.next_pings: an rtt is not finite")
    if ann.relays and ann.reachability == Reachability.REACHABLE:
        raise ProtocolError("announcement.relays given by a server that is reachable")
    return ann


def servers_from_records(
    records: Mapping[str, Mapping[PeerId, Record]],
    model_id: str,
    num_layers: int,
    blocks: range | None = None,
) -> list[ServerView]:
    """One `ServerView` per announcing peer, from the records of a model's block keys.

    ``blocks`` limits which block keys are read (default: all). A record that
    `decode_announcement` refuses is dropped (and logged); of a peer's records the one with
    the highest ``seq`` wins. Never raises for bad records.
    """
    best: dict[PeerId, tuple[int, ServerAnnouncement]] = {}
    for block in blocks if blocks is not None else range(num_layers):
        key = block_key(model_id, block)
        for peer, record in records.get(key, {}).items():
            if record.value is None:
                continue
            try:
                ann = decode_announcement(record.value, block, num_layers)
            except ProtocolError as exc:
                log.info("dropping announcement of %s under %s: %s", peer, key, exc)
                continue
            held = best.get(peer)
            if held is None or record.seq > held[0]:
                best[peer] = (record.seq, ann)
    return [_view(peer, ann) for peer, (_seq, ann) in best.items()]


def with_relay_loads(
    servers: Sequence[ServerView], relays: Sequence[RelayView]
) -> list[ServerView]:
    """``servers`` with each relayed one dialed through the least loaded of its announced
    relays that announce themselves in ``relays`` (the earlier announced unless another is
    `RELAY_LOAD_MARGIN` less loaded; its first when none announces itself), and that
    relay's load in `ServerView.relay_load`. A relay's load comes from its own signed
    record, not from the relayed server's."""
    loads = {view.peer_id: view.load for view in relays}
    out = []
    for server in servers:
        known = [hop for hop in server.relays if hop.peer_id in loads]
        if not known:
            out.append(server)
            continue
        best = known[0]
        for hop in known[1:]:  # a clearly lighter one only, so the choice does not flap
            if loads[hop.peer_id] < loads[best.peer_id] - RELAY_LOAD_MARGIN:
                best = hop
        out.append(
            replace(
                server,
                address=format_address(best.host, best.port),
                relay_load=loads[best.peer_id],
            )
        )
    return out


def _view(peer: PeerId, ann: ServerAnnouncement) -> ServerView:
    return ServerView(
        peer_id=peer,
        address=format_address(*dial_address(ann)),
        layers=ann.layer_range,
        throughput=ann.throughput,
        free_cache_tokens=ann.free_cache_tokens,
        active_sessions=ann.active_sessions,
        state=ann.state,
        next_pings={p.peer_id: p.rtt for p in ann.next_pings},
        next_delivered={p.peer_id: p.tps for p in ann.next_pings if p.tps > 0},
        dtype=ann.dtype,
        reachability=ann.reachability,
        relays=ann.relays,
        direct_address=format_address(ann.host, ann.port),
        moving_to=ann.moving_to,
        last_move=ann.last_move,
        quantization=ann.quantization,
        room_tokens=ann.room_tokens,
    )


def delivered_by_peers(views: Iterable[ServerView]) -> dict[PeerId, float]:
    """Per server, the tokens per second that *other* servers measured it delivering (their
    announced `ServerView.next_delivered`): the lower median of their figures, so that
    neither one peer that measured it slow nor a few that claim it fast decide alone. A
    server's figures about itself are ignored; a server nobody measured is absent."""
    figures: dict[PeerId, list[float]] = {}
    for view in views:
        for peer, tps in view.next_delivered.items():
            if peer != view.peer_id:
                figures.setdefault(peer, []).append(tps)
    return {peer: sorted(tps)[(len(tps) - 1) // 2] for peer, tps in figures.items()}


def counted_throughput(view: ServerView, measured: float | None) -> float:
    """The tokens/s ``view``'s server is taken to deliver: its announced throughput, or
    `PROBE_SLACK` times what its peers ``measured`` (`delivered_by_peers`) where that is
    less; never more than it announced."""
    if measured is None:
        return view.throughput
    return min(view.throughput, PROBE_SLACK * measured)


async def ping_server(pool: ConnectionPool, server: ServerView, timeout: float) -> float:
    """RTT of one ``info`` call (the channel is dialed first, outside the measurement).

    Raises `SwarmError` subclasses: what dialing or the call raise, `DeadlineExceeded`;
    `trio.TooSlowError` if dialing takes over ``timeout``.
    """
    host, port = parse_address(server.address)
    with trio.fail_after(timeout):
        conn = await pool.get(host, port, server.peer_id)
    start = trio.current_time()
    await call_info(conn, timeout=timeout)
    return trio.current_time() - start
