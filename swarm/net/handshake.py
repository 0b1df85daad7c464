"""The channel handshake: hello (`swarm.net.hello`), Noise XX / XXpsk3 with identity proofs,
confirmation.

Setting a channel up (both sides, under ``NetConfig.handshake_timeout``):

1. Each side sends a hello: ``b"SWRM"``, protocol version, a mode byte (bit 0: private
   swarm). An initiator that knows whom it dials sets bit 1 ("routed") and appends that
   `PeerId` (and, in a private swarm, an HMAC of it under the swarm key), so that a relay
   (`swarm.net.relay`) knows which of its relayed peers to splice the stream onto; the
   peer itself ignores it. The initiator's whole hello is the Noise prologue, so altering
   it (the target included) breaks the handshake. If one side has a swarm key and the
   other does not, both raise `SwarmKeyMismatch` here. A relay that cannot splice answers
   with a hello whose mode has bit 7 set and a `RelayRefusal` code in the low bits. Bit 2
   ("connect-back", with a 32-byte token) is not a handshake at all: a relayed peer opens
   it to its relay to carry one circuit (`swarm.net.relay`).
2. Noise XX (XXpsk3 with the swarm key as PSK), each handshake message prefixed by a 2-byte
   big-endian length that must equal the exact length the pattern implies (so a damaged
   length fails at once instead of waiting for bytes that never come). An identity proof is
   the sender's Ed25519 public key and its signature over the sender's Noise static key,
   binding the channel to a `PeerId`. Both sides use a fresh Noise static key for every
   connection, so that key identifies nothing on its own.
3. The responder ends the handshake with one transport frame, the confirmation: a status
   byte, "accepted" or a `Refusal` code (the server's connection limits, decided once the
   initiator's `PeerId` is known). The initiator waits for it, so a refused handshake (wrong
   swarm key, bad identity proof, a limit) is reported on both sides.

Where the proofs go:

- Open swarm: the responder's proof in message 2, the initiator's in message 3, only the
  status byte in the confirmation. The initiator learns who answered before it reveals itself.
- Private swarm: message 2 is encrypted only under ephemeral-ephemeral DH, which anyone who
  dials can decrypt, and the swarm key is mixed in only at message 3. So message 2 carries
  no payload, the initiator's proof goes in message 3 (readable only with the key), and the
  responder's proof in the confirmation, after the initiator has proven the key. A dialer
  without the key gets a hello, a fresh ephemeral and a fresh static key, and then a closed
  connection: nothing that depends on the server's identity.

Frames after the handshake are `swarm.net.channel.SecureChannel`'s.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum

import trio

from swarm.errors import (
    ConnectError,
    DeadlineExceeded,
    HandshakeError,
    LimitExceeded,
    PeerIdMismatch,
    SwarmError,
    SwarmKeyMismatch,
    map_exceptions,
)
from swarm.identity import Identity, verify_signature
from swarm.net.channel import FRAME_HEADER, ExactReader, ReceiveBudget, SecureChannel
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.hello import (
    HELLO_LEN,
    Hello,
    check_mode,
    check_responder_hello,
    make_hello,
    read_handshake_bytes,
    read_hello,
)
from swarm.net.noise import DHLEN, TAGLEN, CipherState, HandshakeState, KeyPair
from swarm.net.transport import Transport
from swarm.types import PeerId

__all__ = ["Admission", "Refusal", "open_channel", "secure_inbound", "secure_outbound"]

_PROOF_CONTEXT = b"swarm-noise-static-key:"
_PROOF_LEN = 32 + 64  # Ed25519 public key + signature
_LOST_IN_HANDSHAKE: dict[type[BaseException], type[SwarmError]] = {
    trio.BrokenResourceError: HandshakeError,
    trio.ClosedResourceError: HandshakeError,
}


class Refusal(IntEnum):
    """Why a responder refused a channel after an otherwise good handshake (the one-byte
    confirmation payload). The initiator raises `LimitExceeded` with the safe message."""

    PEER_LIMIT = 1
    SERVER_FULL = 2
    UNEXPECTED_PEER = 3  # a connection made for one peer (a hole punch) reached by another

    @property
    def message(self) -> str:
        if self is Refusal.PEER_LIMIT:
            return "the server already has its maximum of channels from this peer"
        if self is Refusal.UNEXPECTED_PEER:
            return "this connection was made for another peer"
        return "the server is at its channel limit and has no idle channel to close"


Admission = Callable[[PeerId], Refusal | None]
"""Decides, once the initiator's `PeerId` is proven, whether the responder keeps the channel:
``None`` to accept, a `Refusal` to refuse it. Runs synchronously inside the handshake."""


def _expected_length(index: int, psk: bool) -> int:
    """Exact length of handshake message `index` with our payloads: none in message 1; the
    responder's proof in message 2 (none in a private swarm); the initiator's in message 3."""
    sealed_proof = _PROOF_LEN + TAGLEN
    if index == 0:
        return DHLEN + (TAGLEN if psk else 0)
    if index == 1:
        return DHLEN + DHLEN + TAGLEN + (TAGLEN if psk else sealed_proof)
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
    with map_exceptions(_LOST_IN_HANDSHAKE, "connection lost during the handshake"):
        await stream.send_all(prefix + struct.pack(">H", len(message)) + message)


async def _read_hs_message(reader: ExactReader, index: int, psk: bool) -> bytes:
    (length,) = struct.unpack(">H", await read_handshake_bytes(reader, 2, f"message {index + 1}"))
    expected = _expected_length(index, psk)
    if length != expected:
        raise HandshakeError(
            f"handshake message {index + 1} is {length} bytes; expected {expected}"
        )
    return await read_handshake_bytes(reader, length, f"message {index + 1}")


async def secure_outbound(
    stream: trio.abc.Stream,
    identity: Identity,
    *,
    expected_peer: PeerId | None = None,
    swarm_key: bytes | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
    receive_budget: ReceiveBudget | None = None,
) -> SecureChannel:
    """Run the initiator's side of the handshake on a connected stream.

    Raises `PeerIdMismatch` if `expected_peer` is given and a different identity answers,
    `SwarmKeyMismatch` if the peer is not in our private swarm (or we are not in its),
    `LimitExceeded` if the peer refused the channel under one of its connection limits,
    `HandshakeError` for any other failure, `DeadlineExceeded` after
    ``config.handshake_timeout``. The stream is closed on failure. ``receive_budget`` is
    handed to the channel (see `SecureChannel`).
    """
    try:
        with trio.fail_after(config.handshake_timeout):
            return await _outbound(
                stream, identity, expected_peer, swarm_key, config, receive_budget
            )
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
    receive_budget: ReceiveBudget | None,
) -> SecureChannel:
    private = swarm_key is not None
    hello = make_hello(private, expected_peer, swarm_key)
    static = KeyPair.generate()
    state = HandshakeState(initiator=True, static=static, prologue=hello, psk=swarm_key)
    reader = ExactReader(stream)
    await _send_hs(stream, state.write_message(), prefix=hello)
    check_responder_hello(await read_handshake_bytes(reader, HELLO_LEN, "hello"), private)
    payload = state.read_message(await _read_hs_message(reader, 1, private))
    if not private:  # open swarm: we know who answered before we reveal ourselves
        peer_id = _check_proof(payload, state.remote_static)
        _check_expected(peer_id, expected_peer)
    await _send_hs(stream, state.write_message(_proof(identity, static.public)))
    send, recv = state.split()
    confirmation = await _read_confirmation(reader, recv, private)
    if private:  # the responder's proof came only after we proved the swarm key
        peer_id = _check_proof(confirmation, state.remote_static)
        _check_expected(peer_id, expected_peer)
    return SecureChannel(reader, send, recv, peer_id, state.handshake_hash, config, receive_budget)


def _check_expected(peer_id: PeerId, expected_peer: PeerId | None) -> None:
    if expected_peer is not None and peer_id != expected_peer:
        raise PeerIdMismatch(f"expected peer {expected_peer} but {peer_id} answered; hanging up")


def _confirmation(private: bool, refusal: Refusal | None, proof: bytes) -> bytes:
    """The confirmation's plaintext: a status byte (0 accepted, else a `Refusal` code),
    then in a private swarm the responder's proof (zeros in a refusal). One fixed size per
    mode, so a damaged header fails at once rather than waiting for bytes never sent."""
    if refusal is not None:
        return bytes([refusal]) + bytes(_PROOF_LEN if private else 0)
    return b"\x00" + (proof if private else b"")


async def _read_confirmation(reader: ExactReader, recv: CipherState, private: bool) -> bytes:
    """Read the responder's confirmation frame and return what follows its status byte:
    the responder's proof in a private swarm, nothing in an open one. Raises
    `LimitExceeded` if the responder refused the channel."""
    expected = FRAME_HEADER.pack(1 + (_PROOF_LEN if private else 0) + TAGLEN)
    try:
        header = await read_handshake_bytes(reader, FRAME_HEADER.size, "confirmation")
        if header != expected:
            raise HandshakeError("the peer's handshake confirmation is malformed")
        sealed = await read_handshake_bytes(
            reader, FRAME_HEADER.unpack(expected)[0], "confirmation"
        )
        payload = recv.decrypt_with_ad(header, sealed)
    except HandshakeError as exc:
        if private:
            raise SwarmKeyMismatch(
                "the peer refused our handshake at the swarm-key step: the swarm key differs "
                "(or the handshake was altered in transit)"
            ) from exc
        raise HandshakeError(f"the peer refused our handshake: {exc}") from exc
    if payload[0] == 0:
        return payload[1:]
    try:
        reason = Refusal(payload[0])
    except ValueError as exc:
        raise HandshakeError(f"the peer refused the channel (unknown code {payload[0]})") from exc
    raise LimitExceeded(f"the peer refused the channel: {reason.message}")


async def secure_inbound(
    stream: trio.abc.Stream,
    identity: Identity,
    *,
    swarm_key: bytes | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
    admit: Admission | None = None,
    receive_budget: ReceiveBudget | None = None,
    hello: tuple[ExactReader, Hello] | None = None,
) -> SecureChannel:
    """Run the responder's side of the handshake on an accepted stream.

    ``admit`` (default: accept everyone) is asked once the dialer's `PeerId` is proven; if
    it returns a `Refusal` the dialer is told so and `LimitExceeded` is raised here.
    ``hello``: the reader of ``stream`` and the hello already read from it with
    `read_hello` (a listener that looks at the target first); the deadline then covers the
    rest of the handshake.
    Raises `SwarmKeyMismatch` if the dialer does not hold our swarm key (or holds one when
    we have none), `HandshakeError` for any other failure, `DeadlineExceeded` after
    ``config.handshake_timeout``. The stream is closed on failure.
    """
    try:
        with trio.fail_after(config.handshake_timeout):
            return await _inbound(stream, identity, swarm_key, config, admit, receive_budget, hello)
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(stream)
        raise DeadlineExceeded(
            f"handshake did not finish within {config.handshake_timeout} s"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _inbound(
    stream: trio.abc.Stream,
    identity: Identity,
    swarm_key: bytes | None,
    config: NetConfig,
    admit: Admission | None,
    receive_budget: ReceiveBudget | None,
    hello: tuple[ExactReader, Hello] | None,
) -> SecureChannel:
    private = swarm_key is not None
    reader, their_hello = hello if hello is not None else (None, None)
    if reader is None or their_hello is None:
        reader = ExactReader(stream)
        their_hello = await read_hello(reader)
    with map_exceptions(_LOST_IN_HANDSHAKE, "connection lost during the handshake"):
        await stream.send_all(make_hello(private))
    if their_hello.token is not None:
        raise HandshakeError("a connect-back hello reached a peer that relays nothing for it")
    check_mode(their_hello.private, private)
    static = KeyPair.generate()
    proof = _proof(identity, static.public)
    state = HandshakeState(initiator=False, static=static, prologue=their_hello.raw, psk=swarm_key)
    state.read_message(await _read_hs_message(reader, 0, private))
    # In a private swarm nothing that identifies us goes out before the key is proven.
    await _send_hs(stream, state.write_message(b"" if private else proof))
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
    channel = SecureChannel(
        reader, send, recv, peer_id, state.handshake_hash, config, receive_budget
    )
    refusal = admit(peer_id) if admit is not None else None
    await channel.send(_confirmation(private, refusal, proof))
    if refusal is not None:
        raise LimitExceeded(f"refused a channel from {peer_id}: {refusal.message}")
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
    receive_budget: ReceiveBudget | None = None,
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
        stream,
        identity,
        expected_peer=expected_peer,
        swarm_key=swarm_key,
        config=config,
        receive_budget=receive_budget,
    )
