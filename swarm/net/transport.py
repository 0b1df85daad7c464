"""The network seam: how bytes streams are opened and served.

Channel, RPC and pool code take a `Transport` instead of calling `trio.open_tcp_stream`, so
tests can run a swarm in one process and the benchmark harness can wrap the transport to add
per-link delay (`swarm.testing`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from swarm.errors import ConnectError, ConnectionClosed, SwarmError, map_exceptions

__all__ = [
    "STREAM_LOST",
    "RelayedStream",
    "StreamHandler",
    "TCPTransport",
    "Transport",
    "address_group",
    "host_key",
    "remote_host",
]

log = logging.getLogger(__name__)

# trio's errors for a byte stream that broke or was closed under us: one mapping for every
# boundary of the wire (`swarm.errors.map_exceptions`)
STREAM_LOST: dict[type[BaseException], type[SwarmError]] = {
    trio.BrokenResourceError: ConnectionClosed,
    trio.ClosedResourceError: ConnectionClosed,
}

StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]


class RelayedStream(trio.abc.Stream):
    """A stream a relay carries to us from a dialer at ``dialer_host`` (as the relay saw
    it): `remote_host` names the dialer, not the relay."""

    def __init__(self, inner: trio.abc.Stream, dialer_host: str) -> None:
        self.inner = inner
        self.dialer_host = dialer_host

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def remote_host(stream: trio.abc.Stream) -> str | None:
    """The host an accepted TCP stream comes from, as `host_key` names it (what per-host
    caps and fair shares count): for a `RelayedStream` the dialer's, as its relay saw it;
    ``None`` for a stream that is not a socket (an in-memory test stream) or whose socket
    is already closed."""
    if isinstance(stream, RelayedStream):
        return host_key(stream.dialer_host) if stream.dialer_host else remote_host(stream.inner)
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        address = stream.socket.getpeername()
    except OSError:
        return None
    return host_key(str(address[0])) if isinstance(address, tuple) else None


def host_key(ip: str) -> str:
    """What one remote party counts as: an IPv4 address itself; a public IPv6 address its
    /64, one subscriber's allocation (whoever holds one has 2**64 addresses to call from,
    as the DHT's source groups reason too); loopback, private and link-local addresses
    themselves (a LAN, or tests on one machine that call from 127.0.0.2 to be another
    host); an IPv4-mapped IPv6 address its IPv4 one."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if not (addr.is_private or addr.is_loopback or addr.is_link_local):
            return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


def address_group(host: str) -> str:
    """What one operator plausibly controls: a public IPv4 /16 or IPv6 /48; a loopback,
    private or link-local address itself (a LAN or one machine); a name itself. A
    `host_key` (an IPv6 /64) counts as its address."""
    try:
        addr = ipaddress.ip_address(host.split("/")[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_private or addr.is_loopback or addr.is_link_local:
        return str(addr)
    prefix = 16 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class Transport(Protocol):
    """Opens outgoing byte streams and serves incoming ones."""

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """A connected stream to ``host:port``. Raises `ConnectError` if unreachable."""
        ...

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept streams on ``host:port`` forever, running ``handler`` for each in its own
        task; reports the bound port (useful with port 0) through ``task_status``. A
        handler's exception is logged and closes only that stream."""
        ...


class TCPTransport:
    """Plain TCP with `TCP_NODELAY` (trio's default for its TCP streams).

    ``local_host`` binds outgoing connections to one local address (a multi-homed host; tests
    use ``127.0.0.2`` to look like another machine on loopback).
    """

    def __init__(self, local_host: str | None = None) -> None:
        self.local_host = local_host

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        with map_exceptions({OSError: ConnectError}, f"cannot connect to {host}:{port}"):
            return await trio.open_tcp_stream(host, port, local_address=self.local_host)

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port = int(listeners[0].socket.getsockname()[1])

        async def guarded(stream: trio.SocketStream) -> None:
            async with stream:
                try:
                    await handler(stream)
                except Exception:  # one bad connection must not stop the server
                    log.exception("connection handler failed")

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, guarded, listeners)
            task_status.started(bound_port)
