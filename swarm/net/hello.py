"""The hello that opens every connection (step 1 of `swarm.net.handshake`): its bytes, its
modes (private, routed, connect-back, a relay's refusal) and its checks.

``b"SWRM"``, the protocol version, a mode byte: bit 0 private swarm; bit 1 routed (the
dialed `PeerId` follows, and in a private swarm an HMAC of it under the swarm key, so that
a relay knows which relayed peer to splice onto); bit 2 connect-back (a 32-byte token
follows: a relayed peer's connection to its relay for one circuit); bit 7 a relay's refusal
(a `RelayRefusal` code in the low bits).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum

from swarm.errors import (
    ConnectError,
    ConnectionClosed,
    HandshakeError,
    LimitExceeded,
    ProtocolError,
    SwarmKeyMismatch,
)
from swarm.net.channel import ExactReader
from swarm.types import PeerId

__all__ = [
    "HELLO_LEN",
    "PROTOCOL_VERSION",
    "TOKEN_LEN",
    "Hello",
    "RelayRefusal",
    "check_mode",
    "check_responder_hello",
    "connect_back_hello",
    "make_hello",
    "read_handshake_bytes",
    "read_hello",
    "refuse_hello",
]

# 2: the confirmation carries a status byte (refusals under connection limits); in private
# swarms the responder's identity proof moved from message 2 to the confirmation.
# 3: routed hellos (the dialed PeerId, for relays), relay refusals, connect-back hellos.
PROTOCOL_VERSION = 3
_MAGIC = b"SWRM"
HELLO_LEN = 6
_PRIVATE, _ROUTED, _CONNECT_BACK, _REFUSED = 0x01, 0x02, 0x04, 0x80
_ROUTE_CONTEXT = b"swarm-relay-route:"
TOKEN_LEN = 32


class RelayRefusal(IntEnum):
    """Why a relay did not splice a routed dial (the low bits of its hello's mode byte)."""

    LIMIT = 1  # a quota of the relay: circuits or bytes/s per dialer address or relayed peer
    UNAVAILABLE = 2  # the relayed peer did not connect back in time
    NOT_MEMBER = 3  # private swarm: the dialer did not prove the swarm key

    @property
    def message(self) -> str:
        if self is RelayRefusal.LIMIT:
            return "the relay refused the circuit: a relay quota is exhausted"
        if self is RelayRefusal.UNAVAILABLE:
            return "the relay could not reach the relayed peer"
        return "the relay relays only members of its private swarm"


@dataclass(frozen=True)
class Hello:
    """An initiator's hello as the responder read it. ``raw`` is its exact bytes (the Noise
    prologue); ``target`` the `PeerId` it dials (routed), ``route_mac`` the private-swarm
    HMAC over it; ``token`` set only for a relay's connect-back."""

    raw: bytes
    private: bool
    target: PeerId | None = None
    route_mac: bytes = b""
    token: bytes | None = None

    def route_mac_ok(self, swarm_key: bytes | None) -> bool:
        """Whether a private swarm's routed hello proves the swarm key (always True in an
        open swarm). Replaying one only opens a circuit whose end-to-end handshake fails."""
        if swarm_key is None:
            return True
        if self.target is None:
            return False
        return hmac.compare_digest(self.route_mac, _route_mac(swarm_key, self.target))


def _route_mac(swarm_key: bytes, target: PeerId) -> bytes:
    return hmac.new(swarm_key, _ROUTE_CONTEXT + target.digest, hashlib.sha256).digest()


def make_hello(
    private: bool, target: PeerId | None = None, swarm_key: bytes | None = None
) -> bytes:
    mode = (_PRIVATE if private else 0) | (_ROUTED if target is not None else 0)
    out = _MAGIC + bytes([PROTOCOL_VERSION, mode])
    if target is not None:
        out += target.digest
        if swarm_key is not None:
            out += _route_mac(swarm_key, target)
    return out


def connect_back_hello(token: bytes) -> bytes:
    """What a relayed peer sends first on a connection that carries one circuit."""
    return _MAGIC + bytes([PROTOCOL_VERSION, _CONNECT_BACK]) + token


def refuse_hello(reason: RelayRefusal) -> bytes:
    """A relay's answer to a routed dial it will not splice."""
    return _MAGIC + bytes([PROTOCOL_VERSION, _REFUSED | reason])


def _check_version(hello: bytes) -> None:
    if hello[:4] != _MAGIC:
        raise HandshakeError("the remote end is not a swarm peer (bad hello)")
    if hello[4] != PROTOCOL_VERSION:
        raise HandshakeError(
            f"the peer speaks protocol version {hello[4]}, we speak {PROTOCOL_VERSION}"
        )


async def read_hello(reader: ExactReader) -> Hello:
    """Read an initiator's hello (with its routed target or connect-back token). Raises
    `HandshakeError` for a hello that is not ours or has an unknown mode."""
    head = await read_handshake_bytes(reader, HELLO_LEN, "hello")
    _check_version(head)
    mode = head[5]
    if mode & ~(_PRIVATE | _ROUTED | _CONNECT_BACK) or (mode & _ROUTED and mode & _CONNECT_BACK):
        raise HandshakeError("the peer's hello has an unknown swarm mode")
    private = bool(mode & _PRIVATE)
    if mode & _CONNECT_BACK:
        token = await read_handshake_bytes(reader, TOKEN_LEN, "hello")
        return Hello(head + token, private, token=token)
    if not mode & _ROUTED:
        return Hello(head, private)
    target = await read_handshake_bytes(reader, 32, "hello")
    mac = await read_handshake_bytes(reader, 32, "hello") if private else b""
    return Hello(head + target + mac, private, PeerId(target), mac)


def check_responder_hello(hello: bytes, private: bool) -> None:
    """Check the responder's hello: ours, the same swarm mode, or a relay's refusal."""
    _check_version(hello)
    mode = hello[5]
    if mode & _REFUSED:
        try:
            reason = RelayRefusal(mode & ~_REFUSED)
        except ValueError as exc:
            raise HandshakeError("the relay refused the circuit (unknown code)") from exc
        if reason is RelayRefusal.LIMIT:
            raise LimitExceeded(reason.message)
        if reason is RelayRefusal.NOT_MEMBER:
            raise SwarmKeyMismatch(reason.message)
        raise ConnectError(reason.message)
    if mode not in (0, 1):
        raise HandshakeError("the peer's hello has an unknown swarm mode")
    check_mode(bool(mode), private)


def check_mode(theirs_private: bool, private: bool) -> None:
    if theirs_private != private:
        ours, theirs = ("a", "no") if private else ("no", "a")
        raise SwarmKeyMismatch(
            f"swarm key differs: we have {ours} swarm key, the peer has {theirs} swarm key"
        )


async def read_handshake_bytes(reader: ExactReader, n: int, what: str) -> bytes:
    try:
        data = await reader.read(n)
    except (ConnectionClosed, ProtocolError) as exc:
        raise HandshakeError(f"connection lost during the handshake ({what})") from exc
    if data is None:
        if what == "hello":
            raise HandshakeError(
                "the peer closed the connection before the handshake began "
                "(it may be at a connection limit)"
            )
        raise HandshakeError(f"the peer closed the connection during the handshake ({what})")
    return bytes(data)
