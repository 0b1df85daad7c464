"""`ConnectionPool`: one RPC channel per peer, reused across calls, dropped when broken."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio

from swarm.errors import SwarmError
from swarm.identity import Identity
from swarm.net.channel import ReceiveBudget
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.handshake import open_channel
from swarm.net.messages import Message
from swarm.net.methods import HandlerRegistry
from swarm.net.punch import DEFAULT_PUNCH_CONFIG, PunchConfig, dial_direct
from swarm.net.punch_guard import PunchAdmission, PunchBackoff
from swarm.net.rpc import RpcConnection
from swarm.net.transport import TCPTransport, Transport
from swarm.types import PeerId

__all__ = ["ConnectionPool", "PoolStatistics", "open_connection_pool"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
PoolKey = PeerId | tuple[str, int]


@dataclass(frozen=True)
class PoolStatistics:
    connections: int  # open channels now
    dials: int  # handshakes made since start


class ConnectionPool:
    """Channels keyed by the expected `PeerId` (or by ``(host, port)`` when none is given).

    Concurrent `get`s for one key share a single dial. A channel that closed or broke is
    removed and the next `get` dials again. Past ``config.max_pool_connections`` the least
    recently used channel is closed, and a channel idle for over half of
    ``config.idle_timeout`` is replaced rather than reused (servers close channels idle for
    ``idle_timeout``; a call must not race that close). Channels draw on ``receive_budget``
    if one is given (a server passes the one its `RpcServer` uses). A relayed channel may be
    replaced by a direct connection (`upgrade`). Make one with `open_connection_pool`.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        identity: Identity,
        transport: Transport,
        swarm_key: bytes | None,
        handlers: HandlerRegistry | None,
        config: NetConfig,
        receive_budget: ReceiveBudget | None = None,
    ) -> None:
        self._nursery = nursery
        self.receive_budget = receive_budget
        self.identity = identity
        self.transport = transport
        self.swarm_key = swarm_key
        self.handlers = handlers
        self.config = config
        self._conns: OrderedDict[PoolKey, RpcConnection] = OrderedDict()
        self._dialing: dict[PoolKey, trio.Lock] = {}
        self._upgrading: dict[PeerId, trio.Lock] = {}
        self._direct: dict[PoolKey, RpcConnection] = {}  # channels that `upgrade` made
        self._upgrades: dict[PeerId, trio.Event] = {}  # `try_upgrade`s running
        self._admission: PunchAdmission | None = None  # made by the first punch's config
        self._backoff: PunchBackoff | None = None
        self.dials = 0

    def get_live(
        self, host: str, port: int, expected_peer: PeerId | None = None
    ) -> RpcConnection | None:
        """The live connection `get` would return without dialing, or None (never waits)."""
        return self._live(expected_peer if expected_peer is not None else (host, port))

    async def get(self, host: str, port: int, expected_peer: PeerId | None = None) -> RpcConnection:
        """A live connection to the peer, dialing it if needed.

        Raises what `open_channel` raises (`ConnectError`, `PeerIdMismatch`,
        `SwarmKeyMismatch`, `HandshakeError`, `DeadlineExceeded`).
        """
        key: PoolKey = expected_peer if expected_peer is not None else (host, port)
        conn = self._live(key)
        if conn is not None:
            return conn
        lock = self._dialing.setdefault(key, trio.Lock())
        async with lock:
            conn = self._live(key)
            if conn is not None:
                return conn
            self.dials += 1
            channel = await open_channel(
                self.transport,
                host,
                port,
                self.identity,
                expected_peer=expected_peer,
                swarm_key=self.swarm_key,
                config=self.config,
                receive_budget=self.receive_budget,
            )
            conn = RpcConnection(channel, self.handlers, self.config)
            await self._nursery.start(self._run, key, conn)
            self._conns[key] = conn
        self._dialing.pop(key, None)
        await self._evict()
        return conn

    def is_direct(self, peer: PeerId, conn: RpcConnection | None = None) -> bool:
        """Whether the channel to ``peer`` (or ``conn``, one that `get` gave for ``peer``)
        is a direct connection that `upgrade` made."""
        conn = self._conns.get(peer) if conn is None else conn
        return conn is not None and not conn.is_closed and self._direct.get(peer) is conn

    async def upgrade(
        self, peer: PeerId, *, towards: str, punch: PunchConfig = DEFAULT_PUNCH_CONFIG
    ) -> bool:
        """Replace the (relayed) channel to ``peer`` by a direct connection made by
        `swarm.net.punch.dial_direct` (``towards``: the relay's host).

        True when the channel to ``peer`` is direct now: calls and streams already on the
        relayed channel go on there, new ones take the direct one, and the relayed channel
        is closed once nothing runs on it. False (logged) when there is no channel to it,
        or no direct connection was made: the relayed channel stays, and ``peer`` is not
        tried again for ``punch.retry_after`` seconds, doubling with each failure in a row up
        to ``punch.max_retry_after`` (`PunchBackoff`). Costs up to ``punch.attempts``
        windows plus the exchanges' round trips when it fails: see `try_upgrade` for the
        way that does not hold the caller up."""
        lock = self._upgrading.setdefault(peer, trio.Lock())
        try:
            async with lock:
                upgraded = await self._upgrade_locked(peer, towards, punch)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._upgrading.pop(peer, None)  # bounded: no lock kept per peer tried
        if upgraded:
            await self._evict()
        return upgraded

    async def _upgrade_locked(self, peer: PeerId, towards: str, punch: PunchConfig) -> bool:
        if self.is_direct(peer):
            return True
        backoff = self._punch_backoff(punch)
        if not backoff.allowed(peer, trio.current_time()):
            return False
        conn = self._live(peer)
        if conn is None:
            return False
        try:
            channel = await dial_direct(
                conn, self.identity, peer, towards=towards, swarm_key=self.swarm_key,
                config=self.config, punch=punch, receive_budget=self.receive_budget,
                admission=self._punch_admission(punch),
            )  # fmt: skip
        except (SwarmError, OSError) as exc:
            wait = backoff.failed(peer, trio.current_time())
            log.info(
                "no direct connection to %s (the relay stays; next try in %.0f s): %s",
                peer, wait, exc,
            )  # fmt: skip
            return False
        backoff.succeeded(peer)
        direct = RpcConnection(channel, self.handlers, self.config)
        await self._nursery.start(self._run, peer, direct)
        self._conns[peer] = direct
        self._direct[peer] = direct
        self._nursery.start_soon(self._retire, conn)
        return True

    async def try_upgrade(
        self, peer: PeerId, *, towards: str, punch: PunchConfig = DEFAULT_PUNCH_CONFIG
    ) -> bool:
        """`upgrade` beside the relayed channel: start it in the pool's own task (unless
        one runs for ``peer`` already, or ``peer`` is in its backoff) and wait for it at
        most ``punch.wait`` seconds. True when the channel to ``peer`` is direct by then;
        otherwise the caller goes on over the relay and a later `get` finds the direct
        channel if the upgrade succeeds. Never raises for a failed punch."""
        if self.is_direct(peer):
            return True
        done = self._upgrades.get(peer)
        if done is None:
            if not self._punch_backoff(punch).allowed(peer, trio.current_time()):
                return False
            done = self._upgrades[peer] = trio.Event()

            async def run() -> None:
                try:
                    await self.upgrade(peer, towards=towards, punch=punch)
                finally:
                    del self._upgrades[peer]
                    done.set()

            self._nursery.start_soon(run)
        with trio.move_on_after(punch.wait):
            await done.wait()
        return self.is_direct(peer)

    def _punch_admission(self, punch: PunchConfig) -> PunchAdmission:
        """The per-address-group budget of our punch dials (one per pool)."""
        if self._admission is None:
            self._admission = punch.admission()
        return self._admission

    def _punch_backoff(self, punch: PunchConfig) -> PunchBackoff:
        if self._backoff is None:
            self._backoff = PunchBackoff(punch.retry_after, punch.max_retry_after)
        return self._backoff

    def punch_failures(self, peer: PeerId) -> int:
        """Failed direct upgrades to ``peer`` in a row (0: none, or it was upgraded since)."""
        return 0 if self._backoff is None else self._backoff.failures(peer)

    async def _retire(self, conn: RpcConnection) -> None:
        """Close a channel that was replaced once nothing runs on it any more (its relay
        circuit then counts against the relay's quotas no longer). Polls every second."""
        while conn.busy and not conn.is_closed:
            await trio.sleep(1.0)
        await conn.aclose()

    async def call(
        self,
        host: str,
        port: int,
        method: str,
        request: Message,
        expect: type[M],
        *,
        expected_peer: PeerId | None = None,
        timeout: float | None = None,
    ) -> M:
        """`get` then `RpcConnection.call` (by the method's name: the product calls through
        the stubs of `swarm.net.surface`); see both for what is raised."""
        conn = await self.get(host, port, expected_peer)
        return await conn.call(method, request, expect, timeout=timeout)

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(connections=len(self._conns), dials=self.dials)

    async def aclose(self) -> None:
        """Close every pooled channel."""
        for conn in list(self._conns.values()):
            await conn.aclose()
        self._conns.clear()

    def _live(self, key: PoolKey) -> RpcConnection | None:
        conn = self._conns.get(key)
        if conn is None:
            return None
        if conn.is_closed:
            del self._conns[key]
            return None
        if not conn.busy and self._idle_for(conn) > self.config.idle_timeout / 2:
            # The server may be about to close it for idleness; a call sent now could
            # cross its close. Start afresh instead.
            del self._conns[key]
            self._nursery.start_soon(conn.aclose)
            return None
        self._conns.move_to_end(key)
        return conn

    @staticmethod
    def _idle_for(conn: RpcConnection) -> float:
        return trio.current_time() - conn.channel.last_activity

    async def _run(
        self, key: PoolKey, conn: RpcConnection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            await conn.run(task_status=task_status)
        finally:
            if self._conns.get(key) is conn:
                del self._conns[key]
            if self._direct.get(key) is conn:
                del self._direct[key]

    async def _evict(self) -> None:
        while len(self._conns) > self.config.max_pool_connections:
            _key, oldest = self._conns.popitem(last=False)
            await oldest.aclose()


@asynccontextmanager
async def open_connection_pool(
    identity: Identity,
    *,
    transport: Transport | None = None,
    swarm_key: bytes | None = None,
    handlers: HandlerRegistry | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
    receive_budget: ReceiveBudget | None = None,
) -> AsyncIterator[ConnectionPool]:
    """A pool whose channels live as long as the ``async with`` block.

    ``handlers`` (optional) serves calls the remote side makes back over our channels;
    ``receive_budget`` (optional) caps the bytes its channels hold for messages being
    received (default: no budget beyond ``config.max_message_size`` per channel).
    """
    async with trio.open_nursery() as nursery:
        pool = ConnectionPool(
            nursery,
            identity,
            transport or TCPTransport(),
            swarm_key,
            handlers,
            config,
            receive_budget,
        )
        try:
            yield pool
        finally:
            await pool.aclose()
            nursery.cancel_scope.cancel()
