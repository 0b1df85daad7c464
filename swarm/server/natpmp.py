"""Port mapping by PCP (RFC 6887) and NAT-PMP (RFC 6886), for routers that speak them
instead of UPnP IGD. Both are UDP exchanges with the default gateway on port 5351:

    PCP MAP          request  60 bytes: version 2, opcode 1, lifetime, our address (as
                                        IPv4-mapped IPv6), a 12-byte nonce, protocol 6
                                        (TCP), internal port, suggested external port
                     response 60 bytes: version 2, 0x81, result, granted lifetime, epoch,
                                        the nonce, internal port, assigned external port
                                        and address
    NAT-PMP address  request  2 bytes: version 0, opcode 0
                     response 12 bytes: version, 128, result, epoch, external IPv4
    NAT-PMP map TCP  request  12 bytes: version 0, opcode 2, reserved, internal port,
                                        suggested external port, requested lifetime
                     response 16 bytes: version, 130, result, epoch, internal port,
                                        mapped external port, granted lifetime

PCP is asked first; a gateway that answers it in NAT-PMP ("unsupported version", RFC 6887
§9) is asked in NAT-PMP from then on. A request is sent again after 250 ms, then after twice
as long each time (RFC 6886 §3.1), until the mapper's ``timeout``; the socket is connected
to the gateway, so only its answers are read, and a PCP answer must carry our nonce. A
mapping is renewed by asking again (with the same nonce;
`swarm.server.portmap.keep_port_mapped` does so at half the granted lifetime) and removed by
asking for lifetime 0 (RFC 6886 §3.4, RFC 6887 §15).

Written here rather than taken from PyPI: the libraries there (``py-natpmp`` 0.2.5,
``NAT-PMP`` 1.3.2, forks of one 2008 module) speak NAT-PMP only, hard-code the gateway
port, block in ``select`` for up to 127 s per request, and find the gateway by running
``netstat``; the protocols are the messages above. PCP options (THIRD_PARTY, PREFER_FAILURE,
FILTER) and PEER requests are not used.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
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
_PCP_VERSION = 2
_PCP_MAP = 1
_TCP = 6
_PCP_RESULTS = {
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user over quota",
    11: "cannot provide the external port",
    12: "address mismatch (another NAT in between)",
    13: "excessive remote peers",
}
_RESULTS = {
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


class _Refused(Exception):
    """The gateway answered with a result code other than success."""


def _mapped_v6(host: str) -> bytes:
    """An IPv4 address as PCP carries it (IPv4-mapped IPv6, RFC 6887 §5)."""
    return ipaddress.IPv6Address(f"::ffff:{host}").packed


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
        self._speaks_pcp = True  # until the gateway answers PCP in NAT-PMP
        self._nonces: dict[int, bytes] = {}  # PCP mapping nonce per internal port

    def _gateway(self) -> tuple[str, int] | None:
        if self.gateway is None:
            host = default_gateway()
            return None if host is None else (host, NATPMP_PORT)
        if ":" in self.gateway:
            return parse_address(self.gateway)
        return self.gateway, NATPMP_PORT

    async def _exchange(
        self,
        sock: trio.socket.SocketType,
        request: bytes,
        answers: Callable[[bytes], bool],
    ) -> bytes:
        """Send ``request`` until a datagram that ``answers`` it comes, and return that
        (the caller bounds the time; 250 ms before the first resend, doubling)."""
        wait = _FIRST_WAIT
        while True:
            await sock.send(request)
            with trio.move_on_after(wait):
                while True:
                    data = await sock.recv(1100)
                    if answers(data):
                        return data
            wait *= 2

    async def _natpmp(
        self, sock: trio.socket.SocketType, opcode: int, request: bytes, size: int
    ) -> bytes:
        """A NAT-PMP exchange: the answer's first ``size`` bytes. Raises `_Refused`."""

        def answers(data: bytes) -> bool:
            return len(data) >= 4 and data[0] == _VERSION and data[1] == _RESPONSE + opcode

        data = await self._exchange(sock, request, answers)
        (result,) = struct.unpack("!H", data[2:4])
        if result != 0:
            raise _Refused(_RESULTS.get(result, f"result code {result}"))
        if len(data) < size:
            raise _Refused(f"a {len(data)}-byte answer, not {size}")
        return data[:size]

    async def _pcp_map(
        self,
        sock: trio.socket.SocketType,
        internal_host: str,
        internal_port: int,
        external_port: int,
        lease: int,
    ) -> PortMapping | None:
        """A PCP MAP exchange (RFC 6887 §11): the mapping, or None when the gateway
        answers in NAT-PMP that it does not speak PCP (§9). Raises `_Refused`."""
        nonce = self._nonces.setdefault(internal_port, os.urandom(12))  # kept for renewals
        client = _mapped_v6(sock.getsockname()[0])  # the request's source (§7.1)
        request = struct.pack("!BBHI16s", _PCP_VERSION, _PCP_MAP, 0, lease, client)
        request += nonce + struct.pack("!B3xHH16s", _TCP, internal_port, external_port, bytes(16))

        def answers(data: bytes) -> bool:
            if len(data) >= 4 and data[0] == _VERSION:  # NAT-PMP only: "unsupported version"
                return True
            return (
                len(data) >= 60 and data[0] == _PCP_VERSION
                and data[1] == 0x80 | _PCP_MAP and data[24:36] == nonce
            )  # fmt: skip

        data = await self._exchange(sock, request, answers)
        if data[0] == _VERSION:
            return None
        result, granted = data[3], struct.unpack("!I", data[4:8])[0]
        if result != 0:
            raise _Refused(_PCP_RESULTS.get(result, f"PCP result code {result}"))
        inner, mapped = struct.unpack("!HH", data[40:44])
        external = ipaddress.IPv6Address(data[44:60])
        host = str(external.ipv4_mapped or external)
        if inner != internal_port:
            raise _Refused(f"an answer for port {inner}, not {internal_port}")
        return PortMapping(host, mapped, internal_host, internal_port, granted)

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
                    if self._speaks_pcp:
                        mapping = await self._pcp_map(
                            sock, internal_host, internal_port, external_port, lease
                        )
                        if mapping is not None:
                            return mapping
                        self._speaks_pcp = False  # a NAT-PMP gateway: ask it that way
                    address = struct.pack("!BB", _VERSION, _OP_ADDRESS)
                    answer = await self._natpmp(sock, _OP_ADDRESS, address, 12)
                    external_host = socket.inet_ntoa(answer[8:12])
                    request = struct.pack(
                        "!BBHHHI", _VERSION, _OP_MAP_TCP, 0, internal_port, external_port, lease
                    )
                    answer = await self._natpmp(sock, _OP_MAP_TCP, request, 16)
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
