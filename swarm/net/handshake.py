"""The channel handshake: hello, Noise XX / XXpsk3 with identity proofs, confirmation.

Setting a channel up (both sides, under ``NetConfig.handshake_timeout``):

1. Each side sends a 6-byte hello: ``b"SWRM"``, protocol version, mode (0 open swarm,
   1 private swarm). The initiator's hello is the Noise prologue, so altering it breaks the
   handshake. If one side has a swarm key and the other does not, both raise
   `SwarmKeyMismatch` here.
2. Noise XX (XXpsk3 with the swarm key as PSK), each handshake message prefixed by a 2-byte
   big-endian length that must equal the exact length the pattern implies (so a damaged
   length fails at once instead of waiting for bytes that never come). The second and third
   messages carry the sender's Ed25519 public key and its signature over the sender's Noise
   static key, binding the channel to a `PeerId`.
3. The responder confirms with an empty transport message; the initiator waits for it, so a
   refused handshake (wrong swarm key, bad identity proof) is reported on both sides.

Frames after the handshake are `swarm.net.channel.SecureChannel`'s.
"""

from __future__ import annotations

import struct

import trio

from swarm.errors import (
    ConnectError,
    ConnectionClosed,
    DeadlineExceeded,
    HandshakeError,
    PeerIdMismatch,
    ProtocolError,
    SwarmKeyMismatch,
)
from swarm.identity import Identity, verify_signature
from swarm.net.channel import FRAME_HEADER, ExactReader, SecureChannel
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.noise import DHLEN, TAGLEN, CipherState, HandshakeState, KeyPair
from swarm.net.transport import Transport
from swarm.types import PeerId

__all__ = ["PROTOCOL_VERSION", "open_channel", "secure_inbound", "secure_outbound"]

PROTOCOL_VERSION = 1
_MAGIC = b"SWRM"
_HELLO_LEN = 6
_PROOF_CONTEXT = b"swarm-noise-static-key:"
_PROOF_LEN = 32 + 64  # Ed25519 public key + signature


def _hello(private: bool) -> bytes:
    return _MAGIC + bytes([PROTOCOL_VERSION, 1 if private else 0])


def _check_hello(hello: bytes, private: bool) -> None:
    if hello[:4] != _MAGIC:
        raise HandshakeError("the remote end is not a swarm peer (bad hello)")
    if hello[4] != PROTOCOL_VERSION:
        raise HandshakeError(
            f"the peer speaks protocol version {hello[4]}, we speak {PROTOCOL_VERSION}"
        )
    if hello[5] not in (0, 1):
        raise HandshakeError("the peer's hello has an unknown swarm mode")
    if bool(hello[5]) != private:
        ours, theirs = ("a", "no") if private else ("no", "a")
        raise SwarmKeyMismatch(
            f"swarm key differs: we have {ours} swarm key, the peer has {theirs} swarm key"
        )


def _expected_length(index: int, psk: bool) -> int:
    """Exact length of handshake message `index` with our payloads (none, proof, proof)."""
    sealed_proof = _PROOF_LEN + TAGLEN
    if index == 0:
        return DHLEN + (TAGLEN if psk else 0)
    if index == 1:
        return DHLEN + DHLEN + TAGLEN + sealed_proof
    return DHLEN + TAGLEN + sealed_proof


def _proof(identity: Identity, noise_static: bytes) -> bytes:
    return identity.public_key + identity.sign(_PROOF_CONTEXT + noise_static)


def _check_proof(payload: bytes, noise_static: bytes | None) -> PeerId:
    if len(payload) != _PROOF_LEN or noise_static is None:
        raise HandshakeError("the peer's identity proof has the wrong size")
    public_key, signature = payload[:32], payload[32:]
    if not verify_signature(public_key, signature, _PROOF_CONTEXT + noise_static):
        raise HandshakeError("the peer's identity signature over its Noise key is invalid")
    return PeerId.from_public_key(public_key)


async def _send_hs(stream: trio.abc.Stream, message: bytes, prefix: bytes = b"") -> None:
    try:
        await stream.send_all(prefix + struct.pack(">H", len(message)) + message)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HandshakeError(f"connection lost during the handshake: {exc}") from exc


async def _read_hs(reader: ExactReader, n: int, what: str) -> bytes:
    try:
        data = await reader.read(n)
    except (ConnectionClosed, ProtocolError) as exc:
        raise HandshakeError(f"connection lost during the handshake ({what})") from exc
    if data is None:
        raise HandshakeError(f"the peer closed the connection during the handshake ({what})")
    return bytes(data)


async def _read_hs_message(reader: ExactReader, index: int, psk: bool) -> bytes:
    (length,) = struct.unpack(">H", await _read_hs(reader, 2, f"message {index + 1}"))
    expected = _expected_length(index, psk)
    if length != expected:
        raise HandshakeError(
            f"handshake message {index + 1} is {length} bytes; expected {expected}"
        )
    return await _read_hs(reader, length, f"message {index + 1}")


async def secure_outbound(
    stream: trio.abc.Stream,
    identity: Identity,
    *,
    expected_peer: PeerId | None = None,
    swarm_key: bytes | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
) -> SecureChannel:
    """Run the initiator's side of the handshake on a connected stream.

    Raises `PeerIdMismatch` if `expected_peer` is given and a different identity answers,
    `SwarmKeyMismatch` if the peer is not in our private swarm (or we are not in its),
    `HandshakeError` for any other failure, `DeadlineExceeded` after
    ``config.handshake_timeout``. The stream is closed on failure.
    """
    try:
        with trio.fail_after(config.handshake_timeout):
            return await _outbound(stream, identity, expected_peer, swarm_key, config)
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(stream)
        raise DeadlineExceeded(
            f"handshake did not finish within {config.handshake_timeout} s"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _outbound(
    stream: trio.abc.Stream,
    identity: Identity,
    expected_peer: PeerId | None,
    swarm_key: bytes | None,
    config: NetConfig,
) -> SecureChannel:
    private = swarm_key is not None
    hello = _hello(private)
    static = KeyPair.generate()
    state = HandshakeState(initiator=True, static=static, prologue=hello, psk=swarm_key)
    reader = ExactReader(stream)
    await _send_hs(stream, state.write_message(), prefix=hello)
    _check_hello(await _read_hs(reader, _HELLO_LEN, "hello"), private)
    payload = state.read_message(await _read_hs_message(reader, 1, private))
    peer_id = _check_proof(payload, state.remote_static)
    if expected_peer is not None and peer_id != expected_peer:
        raise PeerIdMismatch(f"expected peer {expected_peer} but {peer_id} answered; hanging up")
    await _send_hs(stream, state.write_message(_proof(identity, static.public)))
    send, recv = state.split()
    await _read_confirmation(reader, recv, private)
    return SecureChannel(reader, send, recv, peer_id, state.handshake_hash, config)


async def _read_confirmation(reader: ExactReader, recv: CipherState, private: bool) -> None:
    """Read the responder's empty confirmation frame, whose size is known exactly."""
    expected = FRAME_HEADER.pack(TAGLEN)
    try:
        header = await _read_hs(reader, len(expected), "confirmation")
        if header != expected:
            raise HandshakeError("the peer's handshake confirmation is malformed")
        recv.decrypt_with_ad(header, await _read_hs(reader, TAGLEN, "confirmation"))
    except HandshakeError as exc:
        if private:
            raise SwarmKeyMismatch(
                "the peer refused our handshake at the swarm-key step: the swarm key differs "
                "(or the handshake was altered in transit)"
            ) from exc
        raise HandshakeError(f"the peer refused our handshake: {exc}") from exc


async def secure_inbound(
    stream: trio.abc.Stream,
    identity: Identity,
    *,
    swarm_key: bytes | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
) -> SecureChannel:
    """Run the responder's side of the handshake on an accepted stream.

    Raises `SwarmKeyMismatch` if the dialer does not hold our swarm key (or holds one when
    we have none), `HandshakeError` for any other failure, `DeadlineExceeded` after
    ``config.handshake_timeout``. The stream is closed on failure.
    """
    try:
        with trio.fail_after(config.handshake_timeout):
            return await _inbound(stream, identity, swarm_key, config)
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(stream)
        raise DeadlineExceeded(
            f"handshake did not finish within {config.handshake_timeout} s"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _inbound(
    stream: trio.abc.Stream, identity: Identity, swarm_key: bytes | None, config: NetConfig
) -> SecureChannel:
    private = swarm_key is not None
    reader = ExactReader(stream)
    their_hello = await _read_hs(reader, _HELLO_LEN, "hello")
    try:
        await stream.send_all(_hello(private))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HandshakeError("connection lost during the handshake") from exc
    _check_hello(their_hello, private)
    static = KeyPair.generate()
    state = HandshakeState(initiator=False, static=static, prologue=their_hello, psk=swarm_key)
    state.read_message(await _read_hs_message(reader, 0, private))
    await _send_hs(stream, state.write_message(_proof(identity, static.public)))
    message3 = await _read_hs_message(reader, 2, private)
    try:
        payload = state.read_message(message3)
    except HandshakeError as exc:
        if private:
            raise SwarmKeyMismatch(
                "the dialer failed the swarm-key step: the swarm key differs "
                "(or the handshake was altered in transit)"
            ) from exc
        raise
    peer_id = _check_proof(payload, state.remote_static)
    send, recv = state.split()
    channel = SecureChannel(reader, send, recv, peer_id, state.handshake_hash, config)
    await channel.send(b"")
    return channel


async def open_channel(
    transport: Transport,
    host: str,
    port: int,
    identity: Identity,
    *,
    expected_peer: PeerId | None = None,
    swarm_key: bytes | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
) -> SecureChannel:
    """Connect through `transport` and run the handshake as the initiator.

    Raises `ConnectError` if the peer is unreachable (or the connect takes longer than
    ``config.connect_timeout``), and whatever `secure_outbound` raises.
    """
    stream: trio.abc.Stream | None = None
    with trio.move_on_after(config.connect_timeout):
        stream = await transport.connect(host, port)
    if stream is None:
        raise ConnectError(f"cannot connect to {host}:{port} within {config.connect_timeout} s")
    return await secure_outbound(
        stream, identity, expected_peer=expected_peer, swarm_key=swarm_key, config=config
    )
