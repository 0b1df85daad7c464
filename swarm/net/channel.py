"""Encrypted, authenticated message channels between two peers over a byte stream.

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

Transport frames: a 4-byte big-endian header, then ChaCha20-Poly1305 ciphertext (plaintext +
16-byte tag) authenticated with the header as associated data. The header's low 31 bits are
the ciphertext length; the top bit says "more frames of this message follow", so a message
longer than ``max_frame_size`` is split across frames. Nonces count per direction, so a
replayed, reordered, dropped or altered frame fails authentication.
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
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.identity import Identity, PeerId, verify_signature
from swarm.net.noise import DHLEN, TAGLEN, CipherState, HandshakeState, KeyPair
from swarm.net.transport import Transport

__all__ = ["PROTOCOL_VERSION", "SecureChannel", "open_channel", "secure_inbound", "secure_outbound"]

PROTOCOL_VERSION = 1
_MAGIC = b"SWRM"
_HELLO_LEN = 6
_MORE = 0x8000_0000
_LEN_MASK = 0x7FFF_FFFF
_HEADER = struct.Struct(">I")
_PROOF_CONTEXT = b"swarm-noise-static-key:"
_PROOF_LEN = 32 + 64  # Ed25519 public key + signature
_RECV_CHUNK = 256 * 1024


class _Reader:
    """Buffered exact reads from a stream. ``None`` from `read` means clean EOF before any
    byte of the requested item; EOF in the middle is a `ProtocolError`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    def has_buffered(self) -> bool:
        return bool(self._buf)

    async def read(self, n: int) -> bytes | bytearray | None:
        """Exactly ``n`` bytes. Large reads fill one preallocated buffer (one copy)."""
        if len(self._buf) >= n:
            out = bytes(self._buf[:n]) if n < len(self._buf) else bytes(self._buf)
            del self._buf[:n]
            return out
        if n <= _RECV_CHUNK:
            return await self._read_small(n)
        out_buf = bytearray(n)
        view = memoryview(out_buf)
        filled = len(self._buf)
        view[:filled] = self._buf
        self._buf.clear()
        while filled < n:
            chunk = await self._receive(min(n - filled, _RECV_CHUNK), filled, n)
            if chunk is None:
                return None
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return out_buf

    async def _read_small(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            chunk = await self._receive(max(n - len(self._buf), 4096), len(self._buf), n)
            if chunk is None:
                return None
            if not self._buf and len(chunk) == n:
                return bytes(chunk)  # common case: no copy (chunk is bytes already)
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _receive(self, max_bytes: int, have: int, want: int) -> bytes | bytearray | None:
        try:
            chunk = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection lost: {exc}") from exc
        if not chunk:
            if have:
                raise ProtocolError(f"connection closed inside a frame ({have} of {want} bytes)")
            return None
        return chunk


class SecureChannel:
    """An encrypted message channel to one authenticated peer.

    `send` and `receive` move whole messages (bytes); each is safe to call from several
    tasks (calls are serialized). ``remote_peer_id`` is the peer proven by the handshake,
    ``handshake_hash`` the Noise channel-binding value.
    """

    def __init__(
        self,
        reader: _Reader,
        send_cipher: CipherState,
        recv_cipher: CipherState,
        remote_peer_id: PeerId,
        handshake_hash: bytes,
        config: NetConfig,
    ) -> None:
        self._reader = reader
        self._stream = reader.stream
        self._send_cipher = send_cipher
        self._recv_cipher = recv_cipher
        self.remote_peer_id = remote_peer_id
        self.handshake_hash = handshake_hash
        self._config = config
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._broken: str | None = None
        self._mid_message = False

    @property
    def is_closed(self) -> bool:
        """True once the channel was closed or broken; it cannot be used again."""
        return self._broken is not None

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send one message, split into frames of at most ``max_frame_size``.

        Raises `ValueError` if the message exceeds ``max_message_size`` and
        `ConnectionClosed` if the channel is closed or the connection fails. If the send is
        cancelled half-way the channel is broken (closed) and later calls raise
        `ConnectionClosed`; callers that must keep it usable shield their sends.
        """
        view = memoryview(data).cast("B")
        if len(view) > self._config.max_message_size:
            raise ValueError(
                f"message of {len(view)} bytes exceeds max_message_size "
                f"({self._config.max_message_size})"
            )
        await _acquire(self._send_lock)
        try:
            self._check_open()
            await self._send_frames(view)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken = f"connection lost while sending: {exc}"
            raise ConnectionClosed(self._broken) from exc
        except trio.Cancelled:
            self._broken = self._broken or "a send was interrupted; the stream is unusable"
            raise
        finally:
            self._send_lock.release()

    async def _send_frames(self, view: memoryview) -> None:
        step = self._config.max_frame_size
        offset = 0
        while True:
            chunk = view[offset : offset + step]
            offset += len(chunk)
            more = offset < len(view)
            header = _HEADER.pack((len(chunk) + TAGLEN) | (_MORE if more else 0))
            frame = bytearray(_HEADER.size + len(chunk) + TAGLEN)
            frame[: _HEADER.size] = header
            self._send_cipher.encrypt_into(header, chunk, memoryview(frame)[_HEADER.size :])
            await self._stream.send_all(frame)
            if not more:
                return

    async def receive(self) -> bytes:
        """The next whole message.

        Raises `ConnectionClosed` when the peer closed the channel (or it was closed or
        broken here), `ProtocolError` for a frame that is oversized, truncated, or fails
        authentication (tampered, replayed or reordered); after a `ProtocolError` the channel
        is closed.
        """
        await _acquire(self._recv_lock)
        try:
            self._check_open()
            return await self._receive_message()
        except ProtocolError as exc:
            self._broken = f"protocol error: {exc}"
            await trio.aclose_forcefully(self._stream)
            raise
        except ConnectionClosed as exc:
            self._broken = str(exc)
            raise
        except trio.Cancelled:
            if self._mid_message:  # part of a message is consumed: framing is lost
                self._broken = "a receive was interrupted mid-message; the stream is unusable"
            raise
        finally:
            self._recv_lock.release()

    async def _receive_message(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        self._mid_message = self._reader.has_buffered()
        while True:
            header = await self._reader.read(_HEADER.size)
            self._mid_message = True
            if header is None:
                if parts:
                    raise ProtocolError("connection closed inside a multi-frame message")
                raise ConnectionClosed("the peer closed the channel")
            (word,) = _HEADER.unpack(header)
            size = word & _LEN_MASK
            if not TAGLEN <= size <= self._config.max_frame_size + TAGLEN:
                raise ProtocolError(
                    f"frame length {size} outside 16..{self._config.max_frame_size + TAGLEN}"
                )
            total += size - TAGLEN
            if total > self._config.max_message_size:
                raise ProtocolError(f"message exceeds max_message_size ({total} bytes so far)")
            body = await self._reader.read(size)
            if body is None:
                raise ProtocolError("connection closed between a frame header and its body")
            try:
                plain = self._recv_cipher.decrypt_with_ad(header, body)
            except HandshakeError as exc:
                raise ProtocolError(
                    "frame failed authentication (tampered, replayed or reordered)"
                ) from exc
            if not word & _MORE:
                self._mid_message = False
                return plain if not parts else b"".join([*parts, plain])
            parts.append(plain)

    async def aclose(self) -> None:
        """Close the channel; the peer's next `receive` raises `ConnectionClosed`."""
        if self._broken is None:
            self._broken = "the channel was closed locally"
        await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> SecureChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._broken is not None:
            raise ConnectionClosed(self._broken)

    def __repr__(self) -> str:
        return f"SecureChannel({self.remote_peer_id!r})"


async def _acquire(lock: trio.Lock) -> None:
    """Take a lock without a scheduling round when it is free (the I/O that follows
    checkpoints anyway); this is on the per-message path."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


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


async def _read_hs(reader: _Reader, n: int, what: str) -> bytes:
    try:
        data = await reader.read(n)
    except (ConnectionClosed, ProtocolError) as exc:
        raise HandshakeError(f"connection lost during the handshake ({what})") from exc
    if data is None:
        raise HandshakeError(f"the peer closed the connection during the handshake ({what})")
    return bytes(data)


async def _read_hs_message(reader: _Reader, index: int, psk: bool) -> bytes:
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
    reader = _Reader(stream)
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


async def _read_confirmation(reader: _Reader, recv: CipherState, private: bool) -> None:
    """Read the responder's empty confirmation frame, whose size is known exactly."""
    expected = _HEADER.pack(TAGLEN)
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
    reader = _Reader(stream)
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
