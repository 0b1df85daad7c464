"""Whether others can dial this server, and relays when they cannot.

A `ReachabilityKeeper` owns the server's answer to "can I be dialed?" and what follows:

- **check**: ask ``helpers`` peers that announce themselves under `relay_key` (reachable
  servers and ``swarm dht`` nodes), chosen across address groups, to dial our announced
  address back and complete a handshake (`swarm.net.dialback`). The majority of the votes
  cast decides (`decide`): one lying helper among three cannot flip it. With no votes the
  answer is ``unknown``. Done at start and every ``recheck_interval``.
- **port mapping**: when the first check says not ``reachable``, ask the router to forward
  the port (`swarm.server.portmap`: UPnP IGD, then PCP / NAT-PMP) and check the mapped address;
  announce it if it works. A server listening on a loopback address asks only the routers it
  was given (``igd_url``, ``natpmp_gateway``): no router forwards to a host's loopback, and
  discovering one by SSDP took 8 s of every such start (a local swarm's, each test's).
- **relays**: while not ``reachable``, keep reservations at ``relays`` relays (different
  address groups first; `swarm.net.relay.hold_reservation`) and have the server
  re-announce whenever the set changes: a relay that dies is replaced by another.
- **offering**: while ``reachable`` (and ``offer_relay``), announce ourselves as a relay.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from swarm.dht import DHTNode
from swarm.directory import RelayView, relay_key, relays_from_records, spread
from swarm.errors import ConfigError, SwarmError, unwrap_group
from swarm.net.messages import DialBackRequest, RelayHop
from swarm.net.pool import ConnectionPool
from swarm.net.punch import DEFAULT_PUNCH_CONFIG, PunchConfig
from swarm.net.relay import RelayLimits, RelayService, hold_reservation
from swarm.net.surface import call_dial_back
from swarm.server.natpmp import NatPmpPortMapper
from swarm.server.portmap import PortMapper, PortMapping, UPnPPortMapper, keep_port_mapped
from swarm.server.relay_node import keep_relay_announced
from swarm.types import PeerId, Reachability

__all__ = ["ReachabilityConfig", "ReachabilityKeeper", "ReachabilityReport", "decide"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReachabilityConfig:
    """``helpers`` (3) dial-back peers asked per check, each answer within
    ``check_timeout`` (10 s); checks every ``recheck_interval`` (600 s); ``relays`` (2)
    reservations kept while not reachable, a lost one replaced after ``retry`` (1 s);
    ``offer_relay`` (True): relay for others while reachable, within ``relay_limits``;
    ``attach_timeout`` (10 s): how long start-up waits for a first relay;
    ``port_mapping`` (True): when not reachable, ask the router to forward the port for
    ``mapping_lease`` (3600 s) at a time: by UPnP IGD (at ``igd_url``, or discovered when
    None), else by PCP or NAT-PMP (at ``natpmp_gateway``, ``host`` or ``host:port``, or the default
    gateway when None; neither is discovered for a server listening on loopback); ``direct``
    (`DEFAULT_PUNCH_CONFIG`): a `PunchConfig` to try a direct connection (`swarm.net.punch`)
    to each relayed server after our next-hop ping reached it through its relay, beside the
    relayed channel, so that pushes to it skip the relay (None, ``--no-direct``: they go
    through it). It also rations the punches we answer when we are relayed; with None we
    answer none (dialers stay on the relay)."""

    helpers: int = 3
    check_timeout: float = 10.0
    recheck_interval: float = 600.0
    relays: int = 2
    retry: float = 1.0
    offer_relay: bool = True
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    attach_timeout: float = 10.0
    port_mapping: bool = True
    igd_url: str | None = None
    natpmp_gateway: str | None = None
    mapping_lease: int = 3600
    direct: PunchConfig | None = DEFAULT_PUNCH_CONFIG

    def __post_init__(self) -> None:
        if self.helpers < 1 or self.relays < 0:
            raise ConfigError("reachability needs at least one helper and relays >= 0")
        if self.mapping_lease < 2:
            raise ConfigError("reachability mapping_lease must be at least 2 s")
        for name in ("check_timeout", "recheck_interval", "retry", "attach_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"reachability {name} must be positive")


@dataclass(frozen=True)
class ReachabilityReport:
    """One check: the verdict and the votes behind it."""

    verdict: Reachability
    reachable: int = 0
    unreachable: int = 0
    abstained: int = 0  # helpers that declined, failed or did not answer in time


def decide(votes: Sequence[Reachability]) -> ReachabilityReport:
    """The majority of the ``reachable`` / ``unreachable`` votes (``unknown`` abstains);
    a tie or no vote is ``unknown``."""
    yes = sum(v == Reachability.REACHABLE for v in votes)
    no = sum(v == Reachability.UNREACHABLE for v in votes)
    abstained = len(votes) - yes - no
    verdict = Reachability.UNKNOWN
    if yes > no:
        verdict = Reachability.REACHABLE
    elif no > yes:
        verdict = Reachability.UNREACHABLE
    return ReachabilityReport(verdict, yes, no, abstained)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ReachabilityKeeper:
    """See the module docstring. ``changed`` is awaited (re-announce) whenever the verdict
    or the relays change; ``serve_inbound`` takes the streams relays carry to us."""

    def __init__(
        self,
        config: ReachabilityConfig,
        dht: DHTNode,
        pool: ConnectionPool,
        me: PeerId,
        serve_inbound: Callable[[trio.abc.Stream], Awaitable[None]],
        changed: Callable[[], Awaitable[None]],
        relay: RelayService | None,
    ) -> None:
        self.config = config
        self._dht = dht
        self._pool = pool
        self._me = me
        self._serve_inbound = serve_inbound
        self._changed = changed
        self._relay = relay
        self.report = ReachabilityReport(Reachability.UNKNOWN)
        self._attached: dict[int, tuple[RelayHop, RelayView]] = {}
        self._failed: dict[PeerId, float] = {}
        self._first_relay = trio.Event()
        self._any_relay = False
        self._claimed: set[PeerId] = set()  # relays being attached to now
        self._observed: dict[int, str] = {}  # where each attached relay sees us come from
        self.address: tuple[str, int] = ("", 0)  # to announce (port 0: not yet); by `run`
        self.mapping: PortMapping | None = None  # a router's port mapping that works

    @property
    def verdict(self) -> Reachability:
        return self.report.verdict

    @property
    def relays(self) -> tuple[RelayHop, ...]:
        """The relays we hold reservations at now (none while reachable)."""
        if self.verdict == Reachability.REACHABLE:
            return ()
        return tuple(hop for hop, _view in self._attached.values())

    @property
    def observed_hosts(self) -> tuple[str, ...]:
        """The addresses our relays see us connect from (distinct; none while reachable
        or before a relay says)."""
        return tuple(dict.fromkeys(h for h in self._observed.values() if h))

    async def _candidates(self) -> list[RelayView]:
        found = await self._dht.get(relay_key())
        return [v for v in relays_from_records(found) if v.peer_id != self._me]

    async def check(self, host: str, port: int) -> ReachabilityReport:
        """Ask helpers to dial ``host:port`` back; keep and return the report."""
        candidates = await self._candidates()
        self._any_relay = bool(candidates)
        helpers = spread(candidates, self.config.helpers)
        votes: list[Reachability] = []

        async def ask(helper: RelayView) -> None:
            vote = Reachability.UNKNOWN
            with trio.move_on_after(self.config.check_timeout):
                try:
                    conn = await self._pool.get(helper.host, helper.port, helper.peer_id)
                    answer = await call_dial_back(
                        conn, DialBackRequest(host=host, port=port),
                        timeout=self.config.check_timeout,
                    )  # fmt: skip
                    vote = answer.reachability
                except SwarmError as exc:
                    log.info("dial-back by %s failed: %s", helper.peer_id, exc)
            votes.append(vote)

        async with trio.open_nursery() as nursery:
            for helper in helpers:
                nursery.start_soon(ask, helper)
        self.report = decide(votes)
        log.info("reachability of %s:%s: %s", host, port, self.report)
        return self.report

    async def run(
        self,
        host: str,
        port: int,
        *,
        listen_host: str | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Check ``host:port`` now; if not reachable, try a port mapping on the router (the
        RPC port on ``listen_host``) and check the mapped address; then keep relays (or
        offer relaying) and re-check periodically. Reports started once the first check
        is done and, if still not reachable, a first relay is attached (or
        ``attach_timeout`` passed). `address` is what the server should announce."""
        self.address = (host, port)
        await self.check(host, port)
        async with trio.open_nursery() as mapping:
            if self.verdict != Reachability.REACHABLE and self.config.port_mapping:
                await self._try_port_mapping(mapping, listen_host or host, port)
            await self._keep(task_status)

    async def _try_port_mapping(self, nursery: trio.Nursery, listen_host: str, port: int) -> None:
        """Map the port and check the mapped address; keep the mapping only if it works."""
        lease = self.config.mapping_lease
        cfg, loopback = self.config, _is_loopback(listen_host)
        mappers: list[PortMapper] = []
        if cfg.igd_url is not None or not loopback:
            mappers.append(UPnPPortMapper(cfg.igd_url, lease=lease))
        if cfg.natpmp_gateway is not None or not loopback:
            mappers.append(NatPmpPortMapper(cfg.natpmp_gateway, lease=lease))
        if not mappers:
            log.info("port mapping skipped: no router forwards to loopback (%s)", listen_host)
            return
        scope = trio.CancelScope()

        async def hold(*, task_status: trio.TaskStatus[PortMapping | None]) -> None:
            with scope:
                await keep_port_mapped(mappers, listen_host, port, task_status=task_status)

        mapped: PortMapping | None = await nursery.start(hold)
        if mapped is None:
            return
        before = self.report
        await self.check(mapped.external_host, mapped.external_port)
        if self.verdict == Reachability.REACHABLE:
            self.address = (mapped.external_host, mapped.external_port)
            self.mapping = mapped
        else:  # the mapping did not make us reachable: remove it, keep the first answer
            scope.cancel()
            self.report = before

    async def _keep(self, task_status: trio.TaskStatus[None]) -> None:
        started = False
        while True:
            async with trio.open_nursery() as nursery:
                if self.verdict != Reachability.REACHABLE and self.config.relays:
                    for index in range(self.config.relays):
                        nursery.start_soon(self._keep_relay, index)
                    if not started and self._any_relay:
                        with trio.move_on_after(self.config.attach_timeout):
                            await self._first_relay.wait()
                elif self._relay is not None and self.config.offer_relay:
                    nursery.start_soon(self._offer_relay, *self.address)
                if not started:
                    started = True
                    await self._changed()
                    task_status.started()
                while True:  # re-check; the relays (or the offer) stay while nothing changes
                    await trio.sleep(self.config.recheck_interval)
                    before = self.verdict
                    await self.check(*self.address)
                    if self.verdict != before:
                        break
                nursery.cancel_scope.cancel()
            self._attached.clear()
            self._observed.clear()
            await self._changed()

    def _pick(self, candidates: list[RelayView]) -> RelayView | None:
        now = trio.current_time()
        used = {view.peer_id for _hop, view in self._attached.values()} | self._claimed
        fresh = [
            v for v in candidates
            if v.peer_id not in used and now - self._failed.get(v.peer_id, -1e9) > 30.0
        ]  # fmt: skip
        if not fresh:  # every other relay failed recently: try them again anyway
            fresh = [v for v in candidates if v.peer_id not in used]
        used_groups = {view.host for _hop, view in self._attached.values()}
        other_groups = [v for v in fresh if v.host not in used_groups]
        chosen = spread(other_groups or fresh, 1)
        return chosen[0] if chosen else None

    async def _keep_relay(self, index: int) -> None:
        """Hold one reservation; when it is lost, re-announce and attach to another."""
        while True:
            relay = self._pick(await self._candidates())
            if relay is None:
                await trio.sleep(self.config.retry)
                continue
            self._claimed.add(relay.peer_id)
            try:
                conn = await self._pool.get(relay.host, relay.port, relay.peer_id)
                async with trio.open_nursery() as nursery:
                    observed: str = await nursery.start(
                        hold_reservation, conn, self._pool.transport,
                        relay.host, relay.port, self._serve_inbound,
                    )  # fmt: skip
                    self._observed[index] = observed
                    hop = RelayHop(peer_id=relay.peer_id, host=relay.host, port=relay.port)
                    self._attached[index] = (hop, relay)
                    log.info("attached to relay %s at %s:%s", relay.peer_id, relay.host, relay.port)
                    self._first_relay.set()
                    await self._changed()
            except (SwarmError, BaseExceptionGroup) as exc:
                inner = unwrap_group(exc)
                if not isinstance(inner, SwarmError):
                    raise
                log.info("relay %s lost or refused: %s", relay.peer_id, inner)
            finally:
                self._claimed.discard(relay.peer_id)
            self._failed[relay.peer_id] = trio.current_time()
            self._observed.pop(index, None)
            if self._attached.pop(index, None) is not None:
                await self._changed()
            await trio.sleep(self.config.retry)

    async def _offer_relay(self, host: str, port: int) -> None:
        """Announce ourselves as a relay (and dial-back helper) every TTL/2."""
        assert self._relay is not None  # local invariant: checked by run()
        await keep_relay_announced(self._dht, host, port, self._relay)
