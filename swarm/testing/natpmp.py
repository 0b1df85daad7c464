"""A fake NAT-PMP (RFC 6886) and, with ``pcp=True``, PCP (RFC 6887) gateway on loopback
UDP, for port-mapping tests: it answers public-address and TCP/UDP mapping requests and PCP
MAP requests, strictly (a request of the wrong size or version is answered with
"unsupported version" in NAT-PMP, as a NAT-PMP-only gateway answers PCP, or ignored; a PCP
request whose client address is not its source gets "address mismatch"), and records every
request.

    async with open_fake_natpmp(external_ip="127.0.0.1") as gateway:
        gateway.address    # "127.0.0.1:PORT", give it to the mapper as its gateway
        gateway.mappings   # {internal port: (external port, lifetime)}
        gateway.requests   # every request in order: (opcode, internal, external, lifetime)
        gateway.pcp        # every PCP MAP request: (internal, external, lifetime, nonce)
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

__all__ = ["FakeNatPmp", "open_fake_natpmp"]


@dataclass
class FakeNatPmp:
    address: str
    external_ip: str
    max_lifetime: int = 7200  # longer requests are granted this
    result: int = 0  # answer mapping requests with this result code (0: success)
    speaks_pcp: bool = False
    mappings: dict[int, tuple[int, int]] = field(default_factory=dict)
    requests: list[tuple[int, int, int, int]] = field(default_factory=list)
    pcp: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    other_versions: int = 0  # requests answered "unsupported version" (PCP, when not spoken)
    started: float = field(default_factory=time.monotonic)

    def answer(self, data: bytes, source: str = "127.0.0.1") -> bytes | None:
        epoch = int(time.monotonic() - self.started)
        if len(data) < 2:
            return None
        version, opcode = data[0], data[1]
        if version == 2 and self.speaks_pcp:
            return self._pcp(data, source, epoch)
        if version != 0:
            self.other_versions += 1
            return struct.pack("!BBHI", 0, 128 + opcode, 1, epoch)  # unsupported version
        if opcode == 0 and len(data) == 2:
            self.requests.append((0, 0, 0, 0))
            ip = socket.inet_aton(self.external_ip)
            return struct.pack("!BBHI", 0, 128, 0, epoch) + ip
        if opcode in (1, 2) and len(data) == 12:
            _reserved, internal, external, lifetime = struct.unpack("!HHHI", data[2:12])
            self.requests.append((opcode, internal, external, lifetime))
            if self.result:
                return struct.pack("!BBHIHHI", 0, 128 + opcode, self.result, epoch, internal, 0, 0)
            if lifetime == 0:  # delete (RFC 6886 §3.4)
                self.mappings.pop(internal, None)
                return struct.pack("!BBHIHHI", 0, 128 + opcode, 0, epoch, internal, 0, 0)
            granted = min(lifetime, self.max_lifetime)
            mapped = external or internal
            self.mappings[internal] = (mapped, granted)
            return struct.pack("!BBHIHHI", 0, 128 + opcode, 0, epoch, internal, mapped, granted)
        return struct.pack("!BBHI", 0, 128 + opcode, 5, epoch)  # unsupported opcode

    def _pcp(self, data: bytes, source: str, epoch: int) -> bytes | None:
        if len(data) != 60 or data[1] != 1:  # MAP only, no options
            return None
        lifetime = struct.unpack("!I", data[4:8])[0]
        nonce, protocol = data[24:36], data[36]
        internal, external = struct.unpack("!HH", data[40:44])
        self.pcp.append((internal, external, lifetime, nonce))
        result, granted, mapped = 0, min(lifetime, self.max_lifetime), external or internal
        if data[8:24] != _v6(source):
            result = 12  # ADDRESS_MISMATCH
        elif self.result:
            result = self.result
        elif lifetime == 0:
            self.mappings.pop(internal, None)
            mapped = 0
        elif protocol == 6:
            self.mappings[internal] = (mapped, granted)
        if result:
            granted, mapped = 0, 0
        body = nonce + struct.pack("!B3xHH16s", protocol, internal, mapped, _v6(self.external_ip))
        return struct.pack("!BBxBII12x", 2, 0x81, result, granted, epoch) + body


def _v6(host: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{host}").packed


@asynccontextmanager
async def open_fake_natpmp(
    external_ip: str = "127.0.0.1",
    *,
    max_lifetime: int = 7200,
    result: int = 0,
    speaks_pcp: bool = False,
) -> AsyncIterator[FakeNatPmp]:
    """A fake gateway on 127.0.0.1 at a free UDP port, until the block ends."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        gateway = FakeNatPmp(
            f"127.0.0.1:{port}", external_ip, max_lifetime=max_lifetime, result=result,
            speaks_pcp=speaks_pcp,
        )  # fmt: skip

        async def serve() -> None:
            while True:
                data, peer = await sock.recvfrom(1100)
                reply = gateway.answer(data, peer[0])
                if reply is not None:
                    await sock.sendto(reply, peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield gateway
            nursery.cancel_scope.cancel()
