"""`Server`: one serving peer, from loading its layers to draining on shutdown.

    server = Server(config)
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(server.run)    # a `ServerReady` once it is online
        ...
        server.request_stop()                       # announce draining, finish steps, exit

Start-up order: load the layer range (in a worker thread; only those layers are read), join
the DHT, listen for RPC, announce ``joining``, take a first throughput estimate (the
timings kept from the last start with the same key, or one layer timed and scaled, erring
slow: `swarm.server.throughput`), announce ``online`` and report ready; then measure the
span fully between sessions' steps, announce the result at once and keep it for the next
start.
Stop: announce ``draining`` (clients stop routing here), refuse new sessions, wait (up to
``drain_timeout``) for running steps, then close everything.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import trio

from swarm._version import __version__
from swarm.dht import DatagramLinks, DHTNode
from swarm.directory import (
    AnnouncementProver,
    ServerView,
    block_keys,
    servers_from_records,
)
from swarm.errors import (
    ConfigError,
    ConnectError,
    ErrorCode,
    IdentityError,
    PeerIdMismatch,
    RemoteError,
    SwarmError,
)
from swarm.identity import Identity
from swarm.net.channel import ReceiveBudget
from swarm.net.dialback import DialBackService
from swarm.net.handshake import open_channel
from swarm.net.messages import PingEntry, ServerAnnouncement
from swarm.net.methods import HandlerRegistry
from swarm.net.pool import open_connection_pool
from swarm.net.punch import HolePunchService
from swarm.net.relay import RelayService
from swarm.net.rpc_server import RpcServer
from swarm.net.swarm_key import load_swarm_key
from swarm.net.transport import TCPTransport, Transport
from swarm.server.announcer import Announcer, choose_layers
from swarm.server.capacity import available_memory, block_bytes, size_server
from swarm.server.compute import ComputeQueue
from swarm.server.config import ServerConfig
from swarm.server.device import resolve_device, resolve_dtype
from swarm.server.handlers import ServingHandlers, ServingState
from swarm.server.liveness import PeerWatch, info_ping
from swarm.server.moving import RangeMover
from swarm.server.reachability import ReachabilityKeeper
from swarm.server.rebalancer import Rebalancer
from swarm.server.sessions import SessionTable
from swarm.server.throughput import ThroughputKeeper
from swarm.shards import KVCache, ModelConfig, Span, load_span, model_id, resolve_quantization
from swarm.types import (
    LayerRange,
    PeerId,
    Reachability,
    ServerState,
    format_address,
    parse_address,
)

__all__ = ["Server", "ServerReady"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerReady:
    """What `Server.run` reports once the server is online."""

    peer_id: PeerId
    host: str
    port: int
    dht_address: str
    layers: LayerRange
    model_id: str
    throughput: float
    reachability: Reachability = Reachability.UNKNOWN
    relays: tuple[str, ...] = ()  # "host:port" of the relays it is dialed through


class Server:
    """A serving peer. Construct, then ``await nursery.start(server.run)``.

    ``identity`` defaults to the key at ``config.identity_path`` (created if missing), or,
    when that is None, to a fresh in-memory key, so two servers never share one by accident;
    ``transport`` to TCP; ``on_progress`` receives one line per start-up stage;
    ``wrap_handlers`` turns the honest handlers into the registry served (the seam that
    `swarm.testing` adversaries and the lab's liar use); default: ``handlers.registry()``.
    ``dht_links`` is for tests only (the DHT's datagrams through emulated links,
    `swarm.dht.links`).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        identity: Identity | None = None,
        transport: Transport | None = None,
        on_progress: Callable[[str], None] | None = None,
        drain_timeout: float = 30.0,
        wrap_handlers: Callable[[ServingHandlers], HandlerRegistry] | None = None,
        dht_links: DatagramLinks | None = None,
    ) -> None:
        self.config = config
        if identity is None:
            path = config.identity_path
            identity = Identity.load_or_create(path) if path else Identity.generate()
        self.identity = identity
        self.transport = transport or TCPTransport()
        self.swarm_key = load_swarm_key(config.swarm_key_path) if config.swarm_key_path else None
        self._progress = on_progress or (lambda message: log.info("%s", message))
        self.drain_timeout = drain_timeout
        self._wrap_handlers = wrap_handlers
        self._dht_links = dht_links  # testing: the DHT's datagrams through emulated links
        self._stop = trio.Event()
        self.handlers: ServingHandlers | None = None
        self.announcer: Announcer | None = None
        self.reachability: ReachabilityKeeper | None = None
        self.relay: RelayService | None = None
        self.hole_punch: HolePunchService | None = None  # direct connections through relays
        self.rebalancer: Rebalancer | None = None
        self._pinned = config.layers is not None  # an explicit range rebalances only if told

    def request_stop(self) -> None:
        """Begin a clean stop: `run` drains and returns."""
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[ServerReady] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until `request_stop` (or cancellation). Raises `ShardError` / `ConfigError`
        for a model or option that cannot be served, `DHTError` if the DHT cannot start,
        `IdentityError` if a live server elsewhere already announces our `PeerId`."""
        cfg = self.config
        torch.set_num_threads(cfg.num_threads)
        model = ModelConfig.from_pretrained(cfg.model)
        # abandon_on_cancel: Ctrl-C during start-up stops at once, not after the read ends
        the_model_id = await trio.to_thread.run_sync(model_id, cfg.model, abandon_on_cancel=True)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, model, device)
        quant = resolve_quantization(cfg.model, cfg.quant, device)
        dht_config = cfg.dht
        if self.swarm_key is not None:
            dht_config = dataclasses.replace(dht_config, swarm_key=self.swarm_key)
        prover = AnnouncementProver(  # storing nodes keep answering servers' records first
            self.identity, transport=self.transport, swarm_key=self.swarm_key, config=cfg.net
        )
        async with DHTNode.open(
            self.identity, dht_config, prover=prover, links=self._dht_links
        ) as dht:
            await self._refuse_duplicate(dht, the_model_id, model.num_hidden_layers)
            sized = size_server(
                model,
                dtype,
                device,
                layers=len(cfg.layers) if cfg.layers is not None else None,
                num_blocks=cfg.num_blocks,
                cache_tokens=cfg.limits.cache_tokens,
                derive_cache=cfg.cache_tokens_from_memory,
                plan=cfg.memory,
                quant=quant,
            )
            limits = dataclasses.replace(cfg.limits, cache_tokens=sized.cache_tokens)
            self.config = cfg = dataclasses.replace(cfg, limits=limits)  # what is served
            layers = cfg.layers
            if layers is None:
                layers = await choose_layers(
                    dht, the_model_id, model.num_hidden_layers, sized.num_blocks
                )
            self._progress(
                f"loading layers {layers} of {cfg.model} ({dtype}, weights {quant.value}, {device})"
            )
            span = await trio.to_thread.run_sync(
                lambda: load_span(cfg.model, layers, dtype=dtype, device=device, quant=quant),
                abandon_on_cancel=True,
            )
            await self._serve(span, dht, the_model_id, task_status)

    async def _refuse_duplicate(self, dht: DHTNode, the_model_id: str, num_layers: int) -> None:
        """Raise `IdentityError` if our `PeerId` is announced ``online`` or ``joining``
        (records in the DHT are unexpired) from another address where a peer still answers
        as us. Draining announcements, and addresses that refuse or answer as someone else
        (a crashed duplicate), do not block the start."""
        me, cfg = self.identity.peer_id, self.config
        found = await dht.get_many(block_keys(the_model_id, num_layers))
        ours = format_address(cfg.public_host or cfg.host, cfg.port)
        for view in servers_from_records(found, the_model_id, num_layers):
            if view.peer_id != me or view.state == ServerState.DRAINING:
                continue
            if cfg.port and view.address == ours:
                continue  # our own earlier life at this very address
            if await self._answers_as_us(*parse_address(view.address)):
                raise IdentityError(
                    f"peer id {me} is already served live from {view.address}"
                    f" (layers {view.layers}, {view.state}): "
                    "another server uses this identity; give this one its own "
                    "(--identity-name NAME, another --identity file, or neither)"
                )

    async def _answers_as_us(self, host: str, port: int) -> bool:
        """Whether a peer at host:port completes a handshake as our `PeerId` (or does not
        answer in time, which a slow live server might do)."""
        with trio.move_on_after(self.config.ping_timeout):
            try:
                channel = await open_channel(
                    self.transport,
                    host,
                    port,
                    self.identity,
                    expected_peer=self.identity.peer_id,
                    swarm_key=self.swarm_key,
                    config=self.config.net,
                )
            except (ConnectError, PeerIdMismatch):
                return False
            except SwarmError:
                return True
            await channel.aclose()
        return True

    async def _serve(
        self,
        span: Span,
        dht: DHTNode,
        the_model_id: str,
        task_status: trio.TaskStatus[ServerReady],
    ) -> None:
        cfg = self.config
        state = ServingState(model_id=the_model_id, version=__version__)

        def allocate(layers: LayerRange, batch: int, length: int) -> KVCache:
            now = handlers.span  # the span served now (a move switches it)
            return KVCache.allocate(now.config, layers, batch, length, now.dtype, now.device)

        sessions = SessionTable(cfg.limits, allocate, lambda layers: handlers.span.narrow(layers))
        queue = ComputeQueue(cfg.compute)
        budget = ReceiveBudget(cfg.net.max_receive_bytes)  # one for every channel, both ways
        async with (
            open_connection_pool(
                self.identity,
                transport=self.transport,
                swarm_key=self.swarm_key,
                config=cfg.net,
                receive_budget=budget,
            ) as pool,
            trio.open_nursery() as nursery,
        ):
            handlers = ServingHandlers(cfg, span, state, sessions, queue, pool)
            self.handlers = handlers
            wrap = self._wrap_handlers
            served = handlers.registry() if wrap is None else wrap(handlers)
            reach = cfg.reachability
            dial_back = DialBackService(
                self.identity, transport=self.transport, swarm_key=self.swarm_key, config=cfg.net
            )

            async def serve_inbound(stream: trio.abc.Stream, peer: PeerId) -> None:
                await rpc.handle_stream(stream, expected_peer=peer)

            # answers dialers that reached us through a relay and try a direct connection
            def observed_hosts() -> tuple[str, ...]:
                keeper = self.reachability
                return keeper.observed_hosts if keeper is not None else ()

            # --no-direct (reach.direct None): no hole punches answered either
            punch = self.hole_punch = (
                None
                if reach.direct is None
                else HolePunchService(serve_inbound, reach.direct, observed_hosts=observed_hosts)
            )
            # a wrapper may serve its own version of a helper (tests: a punch that never dials)
            offered = [dial_back.binding()] + ([] if punch is None else [punch.binding()])
            helpers = [b for b in offered if b.name not in served.names]
            if reach.offer_relay:
                self.relay = RelayService(
                    self.identity, swarm_key=self.swarm_key, limits=reach.relay_limits
                )
                helpers.append(self.relay.binding())
            rpc = RpcServer(
                self.identity,
                served.with_bindings(helpers),
                transport=self.transport,
                swarm_key=self.swarm_key,
                config=cfg.net,
                receive_budget=budget,
                relay=self.relay,
            )
            await nursery.start(queue.run)
            if punch is not None:
                await nursery.start(punch.run)
            await nursery.start(sessions.run_reaper)
            try:
                port = await nursery.start(rpc.serve, cfg.host, cfg.port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
                ) from exc
            host = cfg.public_host or cfg.host
            public, bound = host, port  # announced until the reachability check says more

            def make(pings: tuple[PingEntry, ...]) -> ServerAnnouncement:
                keeper = self.reachability
                host, port = keeper.address if keeper and keeper.address[1] else (public, bound)
                return ServerAnnouncement(
                    reachability=keeper.verdict if keeper else Reachability.UNKNOWN,
                    relays=keeper.relays if keeper else (),
                    host=host,
                    port=port,
                    layer_range=handlers.span.layers,
                    state=state.state,
                    dtype=str(handlers.span.dtype).removeprefix("torch."),
                    quantization=handlers.span.quantization.value,
                    throughput=state.throughput_at(len(sessions)),
                    free_cache_tokens=sessions.free_tokens,
                    room_tokens=sessions.room_tokens,
                    active_sessions=len(sessions),
                    version=state.version,
                    next_pings=pings,
                    moving_to=state.moving_to,
                    last_move=state.last_move,
                )

            announcer = Announcer(
                dht,
                pool,
                the_model_id,
                span.layers,
                span.config.num_hidden_layers,
                cfg.announce_ttl,
                cfg.ping_timeout,
                make,
                direct=reach.direct,
                probe_hidden=span.config.hidden_size,
            )
            self.announcer = announcer
            await announcer.announce()  # joining

            async def reachability_changed() -> None:
                keeper = self.reachability
                if keeper is not None:
                    state.reachability, state.relayed = keeper.verdict, bool(keeper.relays)
                    await announcer.announce()

            keeper = ReachabilityKeeper(
                reach, dht, pool, self.identity.peer_id, rpc.handle_stream,
                reachability_changed, self.relay,
            )  # fmt: skip
            self.reachability = keeper
            self._progress(f"checking that others can dial {format_address(host, port)}")
            await nursery.start(functools.partial(keeper.run, listen_host=cfg.host), host, port)
            host, port = keeper.address
            self._progress(
                f"reachability: {keeper.verdict} ({keeper.report.reachable} of "
                f"{keeper.report.reachable + keeper.report.unreachable} votes reachable)"
                + (f", through relays {_relay_list(keeper)}" if keeper.relays else "")
            )
            throughput = ThroughputKeeper(
                cfg, span, state, queue, the_model_id, progress=self._progress
            )
            if cfg.measure_throughput:
                await throughput.first_estimate()
            else:
                state.throughput = 1.0
            await announcer.measure_next_pings()
            state.state = ServerState.ONLINE
            await announcer.announce()
            await nursery.start(announcer.run)
            if cfg.balance.rebalances(pinned=self._pinned):
                self.rebalancer = self._rebalancer(dht, the_model_id, handlers, sessions, queue)
                await nursery.start(self.rebalancer.run)
            if cfg.measure_throughput:
                nursery.start_soon(throughput.measure_online, announcer.announce)
            task_status.started(
                ServerReady(
                    self.identity.peer_id,
                    host,
                    port,
                    dht.address,
                    span.layers,
                    the_model_id,
                    state.throughput,
                    keeper.verdict,
                    _relay_list(keeper),
                )
            )
            await self._stop.wait()
            await self._drain(state, announcer, queue, sessions)
            nursery.cancel_scope.cancel()

    def _rebalancer(
        self,
        dht: DHTNode,
        the_model_id: str,
        handlers: ServingHandlers,
        sessions: SessionTable,
        queue: ComputeQueue,
    ) -> Rebalancer:
        """The loop that moves this server where the swarm needs it (`swarm.server.balance`)."""
        cfg, announcer = self.config, self.announcer
        assert announcer is not None  # set by _serve before this is called
        num_layers = handlers.span.config.num_hidden_layers

        async def load(layers: LayerRange) -> Span:
            now = handlers.span
            self._progress(f"loading layers {layers} of {cfg.model} to move there")
            return await trio.to_thread.run_sync(
                lambda: load_span(
                    cfg.model, layers, dtype=now.dtype, device=now.device, quant=now.quantization
                ),
                abandon_on_cancel=True,
            )

        def holds_both(layers: LayerRange) -> bool:
            now = handlers.span
            needed = block_bytes(now.config, now.dtype, now.quantization) * len(layers)
            return available_memory(now.device) * cfg.memory.usable_fraction >= needed

        async def read() -> list[ServerView]:
            found = await dht.get_many(block_keys(the_model_id, num_layers))
            return servers_from_records(found, the_model_id, num_layers)

        def drop(old: Span) -> None:
            old.to(device="meta")  # frees the old weights even where something still holds it

        mover = RangeMover(
            handlers, sessions, queue, announcer,
            load=load, holds_both=holds_both, drop=drop,
            drain_timeout=cfg.balance.drain_timeout, on_failure=self.request_stop,
        )  # fmt: skip
        me = self.identity.peer_id
        watch = PeerWatch(me, num_layers, info_ping(announcer.pool, cfg.ping_timeout))
        return Rebalancer(
            cfg.balance, me, num_layers,
            read=read, current=lambda: handlers.span.layers,
            throughput=lambda: handlers.state.throughput, intend=mover.intend, move=mover.move,
            watch=watch,
        )  # fmt: skip

    async def _drain(
        self,
        state: ServingState,
        announcer: Announcer,
        queue: ComputeQueue,
        sessions: SessionTable,
    ) -> None:
        """Announce ``draining``, let open sessions finish (at most ``drain_timeout`` s),
        then end the rest telling their clients the server is going (``unavailable``: they
        move on without counting it a failure)."""
        state.state = ServerState.DRAINING
        with trio.move_on_after(self.drain_timeout) as scope:
            scope.shield = True
            await announcer.announce()
            while len(sessions) or queue.statistics().queued > 0 or queue.running:
                await trio.sleep(0.01)
        going = RemoteError(ErrorCode.UNAVAILABLE, "the server is shutting down")
        if sessions.close_all(going):
            with trio.move_on_after(1.0, shield=True):
                await trio.sleep(0.05)  # the handlers send their clients the reason


def _relay_list(keeper: ReachabilityKeeper) -> tuple[str, ...]:
    return tuple(format_address(hop.host, hop.port) for hop in keeper.relays)
