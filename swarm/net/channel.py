"""Encrypted, authenticated message channels between two peers over a byte stream.

Transport frames: a 4-byte big-endian header, then ChaCha20-Poly1305 ciphertext (plaintext +
16-byte tag) authenticated with the header as associated data. The header's low 31 bits are
the ciphertext length; the top bit says "more frames of this message follow", so a message
longer than ``max_frame_size`` is split across frames. Nonces count per direction, so a
replayed, reordered, dropped or altered frame fails authentication.

A `SecureChannel` is made by the handshake in `swarm.net.handshake`.
"""

from __future__ import annotations

import struct

import trio

from swarm.errors import (
    ConnectionClosed,
    HandshakeError,
    ProtocolError,
)
from swarm.net.config import NetConfig
from swarm.net.noise import TAGLEN, CipherState
from swarm.types import PeerId

__all__ = ["FRAME_HEADER", "ExactReader", "SecureChannel"]

_MORE = 0x8000_0000
_LEN_MASK = 0x7FFF_FFFF
FRAME_HEADER = struct.Struct(">I")
_RECV_CHUNK = 256 * 1024


class ExactReader:
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
        reader: ExactReader,
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
            header = FRAME_HEADER.pack((len(chunk) + TAGLEN) | (_MORE if more else 0))
            frame = bytearray(FRAME_HEADER.size + len(chunk) + TAGLEN)
            frame[: FRAME_HEADER.size] = header
            self._send_cipher.encrypt_into(header, chunk, memoryview(frame)[FRAME_HEADER.size :])
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
            header = await self._reader.read(FRAME_HEADER.size)
            self._mid_message = True
            if header is None:
                if parts:
                    raise ProtocolError("connection closed inside a multi-frame message")
                raise ConnectionClosed("the peer closed the channel")
            (word,) = FRAME_HEADER.unpack(header)
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
