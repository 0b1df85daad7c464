"""Dial-back: a peer asks us to dial its announced address and complete a handshake with it,
so that it learns whether others can reach it (`swarm.server.reachability` asks several
of us and takes the majority).

What we dial is bounded, so that nobody can use us to knock on a third party's door: only
the caller's own host (as its channel to us comes from it), or, when the caller comes from
a loopback or private address, another loopback or private address (one machine, one LAN).
Anything else is answered ``unknown`` (we abstain). Each caller host gets a few dial-backs
per minute, at most ``concurrency`` run at once, each within ``timeout``.
"""

from __future__ import annotations

import ipaddress

import trio

from swarm.errors import LimitExceeded, SwarmError
from swarm.identity import Identity
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.handshake import open_channel
from swarm.net.messages import DialBackRequest, DialBackResponse
from swarm.net.methods import Binding
from swarm.net.quota import TokenBuckets
from swarm.net.rpc import CallContext
from swarm.net.surface import DIAL_BACK
from swarm.net.transport import TCPTransport, Transport, host_key
from swarm.types import Reachability

__all__ = ["DialBackService", "is_local_host", "may_dial_back"]


def is_local_host(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("/")[0])
    except ValueError:
        return False
    return addr.is_private or addr.is_loopback or addr.is_link_local


def may_dial_back(target_host: str, caller_host: str | None) -> bool:
    """Whether a dial-back to ``target_host`` for a caller seen at ``caller_host`` (a
    `host_key`; None for a stream that is not a socket) is one we make."""
    if caller_host is None:
        return True
    if host_key(target_host) == caller_host:
        return True
    return is_local_host(target_host) and is_local_host(caller_host)


class DialBackService:
    """Serves ``rpc_dial_back``: dial the address asked for, expect the caller's `PeerId`.

    A handshake that completes, or is refused by the target's connection limits after it
    proved its identity, is ``reachable``; a connect or handshake failure or the deadline is
    ``unreachable``. Raises `LimitExceeded` when the caller's host asks too often.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        transport: Transport | None = None,
        swarm_key: bytes | None = None,
        config: NetConfig = DEFAULT_NET_CONFIG,
        timeout: float = 5.0,
        concurrency: int = 8,
        per_minute: float = 12.0,
    ) -> None:
        self.identity = identity
        self.transport = transport or TCPTransport()
        self.swarm_key = swarm_key
        self.config = config
        self.timeout = timeout
        self._limit = trio.Semaphore(concurrency)
        self._rates = TokenBuckets(rate=per_minute / 60.0, burst=max(per_minute / 4, 1.0))

    def binding(self) -> Binding:
        """``dial_back`` as a registry serves it."""
        return DIAL_BACK.bind(self.rpc_dial_back)

    async def rpc_dial_back(self, request: DialBackRequest, ctx: CallContext) -> DialBackResponse:
        if not may_dial_back(request.host, ctx.peer_host):
            return DialBackResponse(Reachability.UNKNOWN)
        if not self._rates.try_take(ctx.peer_host or "", 1.0):
            raise LimitExceeded("too many dial-back requests from this address")
        async with self._limit:
            verdict = await self._dial(request.host, request.port, ctx)
        return DialBackResponse(verdict)

    async def _dial(self, host: str, port: int, ctx: CallContext) -> Reachability:
        with trio.move_on_after(self.timeout):
            try:
                channel = await open_channel(
                    self.transport, host, port, self.identity,
                    expected_peer=ctx.peer_id, swarm_key=self.swarm_key, config=self.config,
                )  # fmt: skip
            except LimitExceeded:
                return Reachability.REACHABLE  # it proved itself, then was full
            except SwarmError:
                return Reachability.UNREACHABLE
            with trio.CancelScope(shield=True):
                await channel.aclose()
            return Reachability.REACHABLE
        return Reachability.UNREACHABLE
