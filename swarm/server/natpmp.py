"""Port mapping by NAT-PMP (RFC 6886), for routers that speak it instead of UPnP IGD.

NAT-PMP is two UDP exchanges with the default gateway on port 5351, each a fixed-size
message (RFC 6886 §3):

    public address   request  2 bytes: version 0, opcode 0
                     response 12 bytes: version, 128, result, epoch, external IPv4
    map a TCP port   request  12 bytes: version 0, opcode 2, reserved, internal port,
                                        suggested external port, requested lifetime
                     response 16 bytes: version, 130, result, epoch, internal port,
                                        mapped external port, granted lifetime

A request is sent again after 250 ms, then after twice as long each time (§3.1), until
the mapper's ``timeout``; the socket is connected to the gateway, so only its answers are
read (§3.1: responses from elsewhere are ignored). A mapping is renewed by asking again
(`swarm.server.portmap.keep_port_mapped` does so at half the granted lifetime) and
removed by asking for lifetime 0 with external port 0 (§3.4).

Written here rather than taken from PyPI: the libraries there (``py-natpmp`` 0.2.5,
``NAT-PMP`` 1.3.2, forks of one 2008 module) hard-code the gateway port, block in
``select`` for up to 127 s per request, and find the gateway by running ``netstat``; the
protocol is the two messages above. PCP (RFC 6887), NAT-PMP's successor, is not spoken;
PCP servers that keep NAT-PMP compatibility answer these requests.
"""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

import trio

from swarm.server.portmap import PortMapping
from swarm.types import parse_address

__all__ = ["NATPMP_PORT", "NatPmpPortMapper", "default_gateway"]

log = logging.getLogger(__name__)

NATPMP_PORT = 5351
_VERSION = 0
_OP_ADDRESS = 0
_OP_MAP_TCP = 2
_RESPONSE = 128  # a response's opcode is its request's plus 128
_FIRST_WAIT = 0.25  # RFC 6886 §3.1: 250 ms, doubling
_RESULTS = {
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


class _Refused(Exception):
    """The gateway answered with a result code other than success."""


def default_gateway(routes: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 default gateway from the kernel's routing table (Linux), or None."""
    try:
        lines = routes.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        destination, gateway, flags = fields[1], fields[2], int(fields[3], 16)
        if destination == "00000000" and flags & 0x2:  # RTF_GATEWAY
            return socket.inet_ntoa(struct.pack("<I", int(gateway, 16)))
    return None


class NatPmpPortMapper:
    """Maps TCP ports through a NAT-PMP gateway.

    ``gateway`` is ``host`` or ``host:port`` (port 5351 when not given); None asks the
    kernel for the default gateway. ``lease`` seconds requested per mapping (the gateway
    may grant less); each exchange gives up after ``timeout`` seconds.
    """

    def __init__(
        self, gateway: str | None = None, *, lease: int = 3600, timeout: float = 4.0
    ) -> None:
        self.gateway = gateway
        self.lease = lease
        self.timeout = timeout

    def _gateway(self) -> tuple[str, int] | None:
        if self.gateway is None:
            host = default_gateway()
            return None if host is None else (host, NATPMP_PORT)
        if ":" in self.gateway:
            return parse_address(self.gateway)
        return self.gateway, NATPMP_PORT

    async def _exchange(
        self, sock: trio.socket.SocketType, request: bytes, opcode: int, size: int
    ) -> bytes:
        """Send ``request`` until a well-formed answer to ``opcode`` of ``size`` bytes
        comes (the caller bounds the time). Raises `_Refused` for a failure result."""
        wait = _FIRST_WAIT
        while True:
            await sock.send(request)
            with trio.move_on_after(wait):
                while True:
                    data = await sock.recv(64)
                    if len(data) < 4 or data[0] != _VERSION or data[1] != _RESPONSE + opcode:
                        continue  # not an answer to this request
                    (result,) = struct.unpack("!H", data[2:4])
                    if result != 0:
                        raise _Refused(_RESULTS.get(result, f"result code {result}"))
                    if len(data) >= size:
                        return data[:size]
            wait *= 2

    async def _request_mapping(
        self, internal_host: str, internal_port: int, external_port: int, lease: int
    ) -> PortMapping | None:
        gateway = self._gateway()
        if gateway is None:
            log.info("NAT-PMP skipped: no default gateway found")
            return None
        with trio.move_on_after(self.timeout):
            try:
                with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    await sock.connect(gateway)
                    if internal_host in ("", "0.0.0.0", "::"):  # the address the NAT sees
                        internal_host = sock.getsockname()[0]
                    answer = await self._exchange(
                        sock, struct.pack("!BB", _VERSION, _OP_ADDRESS), _OP_ADDRESS, 12
                    )
                    external_host = socket.inet_ntoa(answer[8:12])
                    request = struct.pack(
                        "!BBHHHI", _VERSION, _OP_MAP_TCP, 0, internal_port, external_port, lease
                    )
                    answer = await self._exchange(sock, request, _OP_MAP_TCP, 16)
            except _Refused as exc:
                log.info("NAT-PMP gateway %s:%s refused: %s", *gateway, exc)
                return None
            except OSError as exc:  # unreachable gateway, refused port, no route
                log.info("NAT-PMP gateway %s:%s failed: %s", *gateway, exc)
                return None
            inner, mapped, granted = struct.unpack("!HHI", answer[8:16])
            if inner != internal_port:
                log.info("NAT-PMP gateway answered for port %s, not %s", inner, internal_port)
                return None
            return PortMapping(external_host, mapped, internal_host, internal_port, granted)
        log.info("NAT-PMP: the gateway %s:%s did not answer within %s s", *gateway, self.timeout)
        return None

    async def map(self, internal_host: str, internal_port: int) -> PortMapping | None:
        """Ask for ``internal_port`` to be forwarded from the same external port (the
        gateway may give another, and a shorter lease); None (logged) when there is no
        gateway, it does not answer, or it refuses."""
        mapping = await self._request_mapping(
            internal_host, internal_port, internal_port, self.lease
        )
        if mapping is not None and mapping.lease == 0:
            log.info("NAT-PMP gateway granted a lifetime of 0 s")
            return None
        return mapping

    async def unmap(self, mapping: PortMapping) -> None:
        """Remove the mapping (best effort, logged): lifetime 0, external port 0."""
        await self._request_mapping(mapping.internal_host, mapping.internal_port, 0, 0)
