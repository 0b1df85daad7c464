"""Encrypted, authenticated message channels between two peers over a byte stream.

Transport frames: a 4-byte big-endian header, then ChaCha20-Poly1305 ciphertext (plaintext +
16-byte tag) authenticated with the header as associated data. The header's low 31 bits are
the ciphertext length; the top bit says "more frames of this message follow", so a message
longer than ``max_frame_size`` is split across frames. Nonces count per direction, so a
replayed, reordered, dropped or altered frame fails authentication.

A `SecureChannel` is made by the handshake in `swarm.net.handshake`. Channels that share a
`ReceiveBudget` share one cap on the bytes of messages they are receiving at once.
"""

from __future__ import annotations

import os
import select
import struct
import sys
from dataclasses import dataclass

import trio

from swarm.errors import (
    ConnectionClosed,
    HandshakeError,
    LimitExceeded,
    ProtocolError,
    map_exceptions,
)
from swarm.net.config import NetConfig
from swarm.net.noise import TAGLEN, CipherState
from swarm.net.transport import STREAM_LOST
from swarm.types import PeerId

__all__ = [
    "AT_ONCE_MAX",
    "FRAME_HEADER",
    "ExactReader",
    "ReceiveBudget",
    "ReceiveBudgetStatistics",
    "SecureChannel",
]

_MORE = 0x8000_0000
_LEN_MASK = 0x7FFF_FFFF
FRAME_HEADER = struct.Struct(">I")
_RECV_CHUNK = 256 * 1024
# The most a message (frame header and tag included) may hold to be sent "at once" on a TCP
# socket that polls writable (`SecureChannel.can_send_at_once`). Linux reports a TCP socket
# writable only while its unsent bytes are under half of TCP_NOTSENT_LOWAT (which trio sets
# to 16 KiB on its streams) and at least a third of its send buffer (16 KiB at the least by
# default) is free, so 4 KiB fit without the send waiting for the peer.
AT_ONCE_MAX = 4096
_AT_ONCE_POLL = sys.platform.startswith("linux") and hasattr(select, "poll")


@dataclass(frozen=True)
class ReceiveBudgetStatistics:
    limit: int
    in_use: int
    refused: int


class ReceiveBudget:
    """A cap on the bytes that the channels sharing it hold for messages they are receiving.

    For a message of several frames, a channel reserves each frame's size before it
    allocates the frame, and the whole message's size again before joining the frames; it
    releases everything when the message is handed over or the receive fails. A message of
    one frame is not counted: it is bounded by ``max_frame_size`` per channel (and channels
    by the server's connection caps), so small calls keep working while big messages
    hold the budget. A
    reservation that does not fit is refused at once (never waited for, so channels cannot
    deadlock on each other): that channel fails with `LimitExceeded`, others carry on.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a receive budget must be positive")
        self.limit = limit
        self.in_use = 0
        self.refused = 0

    def try_reserve(self, n: int) -> bool:
        if self.in_use + n > self.limit:
            self.refused += 1
            return False
        self.in_use += n
        return True

    def release(self, n: int) -> None:
        self.in_use -= n

    def statistics(self) -> ReceiveBudgetStatistics:
        return ReceiveBudgetStatistics(self.limit, self.in_use, self.refused)


class ExactReader:
    """Buffered exact reads from a stream. ``None`` from `read` means clean EOF before any
    byte of the requested item; EOF in the middle is a `ProtocolError`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    def has_buffered(self) -> bool:
        return bool(self._buf)

    def take_buffered(self) -> bytes:
        """The bytes read from the stream but not yet consumed (a relay forwards them
        before it splices the raw stream on)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

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
        with map_exceptions(STREAM_LOST, "connection lost"):
            chunk = await self.stream.receive_some(max_bytes)
        if not chunk:
            if have:
                raise ProtocolError(f"connection closed inside a frame ({have} of {want} bytes)")
            return None
        return chunk


class SecureChannel:
    """An encrypted message channel to one authenticated peer.

    `send` and `receive` move whole messages (bytes); each is safe to call from several
    tasks (calls are serialized). ``remote_peer_id`` is the peer proven by the handshake,
    ``handshake_hash`` the Noise channel-binding value, ``last_activity`` the `trio`
    time of the last frame received or message sent (what an idle timeout looks at).
    ``receive_budget``, if given, caps the bytes this channel and the others sharing it
    hold for messages being received.
    """

    def __init__(
        self,
        reader: ExactReader,
        send_cipher: CipherState,
        recv_cipher: CipherState,
        remote_peer_id: PeerId,
        handshake_hash: bytes,
        config: NetConfig,
        receive_budget: ReceiveBudget | None = None,
    ) -> None:
        self._reader = reader
        self._stream = reader.stream
        self._send_cipher = send_cipher
        self._recv_cipher = recv_cipher
        self.remote_peer_id = remote_peer_id
        self.handshake_hash = handshake_hash
        self._config = config
        self._budget = receive_budget
        self._charged = 0  # bytes of the message being received, reserved in the budget
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._broken: str | None = None
        self._mid_message = False
        self.last_activity = trio.current_time()

    @property
    def is_closed(self) -> bool:
        """True once the channel was closed or broken; it cannot be used again."""
        return self._broken is not None

    @property
    def receiving(self) -> bool:
        """True while part of a message has arrived and the rest has not."""
        return self._mid_message and not self.is_closed

    async def send(self, data: bytes | bytearray | memoryview, *, at_once: bool = False) -> None:
        """Encrypt and send one message, split into frames of at most ``max_frame_size``.

        Raises `ValueError` if the message exceeds ``max_message_size`` and
        `ConnectionClosed` if the channel is closed or the connection fails. If the send is
        cancelled half-way the channel is broken (closed) and later calls raise
        `ConnectionClosed`; callers that must keep it usable shield their sends.

        ``at_once``: the caller found `can_send_at_once` true and has not awaited since.
        The frame is then written to the socket directly, without trio's send and the
        yield it makes after writing (~12 us and a pass of the event loop), so such a send
        is not a schedule point, and not a cancellation point either (the caller checks
        before). Should the kernel take only part of it, the rest goes through trio's
        send, shielded, within ``send_timeout``, after which the channel is broken.
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
            stream = self._stream
            if at_once and isinstance(stream, trio.SocketStream) and len(view) <= AT_ONCE_MAX:
                await self._write_at_once(stream, view)
            else:
                await self._send_frames(view)
            self.last_activity = trio.current_time()
        except tuple(STREAM_LOST) as exc:
            self._broken = f"connection lost while sending: {exc}"
            raise ConnectionClosed(self._broken) from exc
        except trio.Cancelled:
            self._broken = self._broken or "a send was interrupted; the stream is unusable"
            raise
        finally:
            self._send_lock.release()

    def can_send_at_once(self, size: int) -> bool:
        """Whether a message of ``size`` bytes would leave now without waiting for the peer
        or for another sender: no send is in progress on the channel, the message is at
        most `AT_ONCE_MAX` bytes with its framing, and the channel runs over a TCP socket
        (Linux) that is writable now. False for any other stream (a relayed or emulated
        one): its sends may wait. Costs one ``poll`` system call."""
        if (
            size + FRAME_HEADER.size + TAGLEN > AT_ONCE_MAX
            or self._send_lock.locked()
            or self._broken is not None
            or not _AT_ONCE_POLL
            or not isinstance(self._stream, trio.SocketStream)
        ):
            return False
        fd = self._stream.socket.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        ready = poller.poll(0)  # [(fd, events)] or []
        return bool(ready) and bool(ready[0][1] & select.POLLOUT)

    async def _send_frames(self, view: memoryview) -> None:
        step = self._config.max_frame_size
        offset = 0
        while True:
            chunk = view[offset : offset + step]
            offset += len(chunk)
            more = offset < len(view)
            await self._stream.send_all(self._frame(chunk, more))
            if not more:
                return

    async def _write_at_once(self, stream: trio.SocketStream, view: memoryview) -> None:
        """`send`'s ``at_once``: one frame written straight to the socket (it is
        non-blocking: the kernel takes what it can); trio's send only for a rest."""
        frame = self._frame(view, more=False)  # at most AT_ONCE_MAX: one frame
        try:
            written = os.write(stream.socket.fileno(), frame)
        except BlockingIOError:
            written = 0
        except OSError as exc:  # reset, broken pipe, closed: as trio's send reports them
            raise trio.BrokenResourceError(str(exc)) from exc
        if written == len(frame):
            return
        deadline = trio.current_time() + self._config.send_timeout
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            await stream.send_all(memoryview(frame)[written:])
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("the rest of a message took over send_timeout")

    def _frame(self, chunk: memoryview, more: bool) -> bytearray:
        """One transport frame: header, then ``chunk`` encrypted (this uses a nonce)."""
        header = FRAME_HEADER.pack((len(chunk) + TAGLEN) | (_MORE if more else 0))
        frame = bytearray(FRAME_HEADER.size + len(chunk) + TAGLEN)
        frame[: FRAME_HEADER.size] = header
        self._send_cipher.encrypt_into(header, chunk, memoryview(frame)[FRAME_HEADER.size :])
        return frame

    async def receive(self) -> bytes:
        """The next whole message.

        Raises `ConnectionClosed` when the peer closed the channel (or it was closed or
        broken here), `ProtocolError` for a frame that is oversized, truncated, or fails
        authentication (tampered, replayed or reordered), or for a message of several
        frames not completed within ``message_timeout``; `LimitExceeded` when a frame or
        the joined message does not fit in the receive budget (refused before it is
        allocated). After a `ProtocolError` or `LimitExceeded` the channel is closed.
        """
        await _acquire(self._recv_lock)
        try:
            self._check_open()
            return await self._receive_message()
        except (ProtocolError, LimitExceeded) as exc:
            self._broken = f"receive failed: {exc}"
            self._release_charge()  # before closing: the peer may act on the close at once
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
            self._release_charge()
            self._recv_lock.release()

    async def _receive_message(self) -> bytes:
        self._mid_message = self._reader.has_buffered()
        more, plain = await self._receive_frame(0, first=True)
        if not more:
            self._mid_message = False
            return plain
        timeout = self._config.message_timeout
        with trio.move_on_after(timeout) as scope:
            message = await self._receive_rest(plain)
        if scope.cancelled_caught:
            raise ProtocolError(f"a message of several frames took over {timeout} s to arrive")
        self._mid_message = False
        return message

    async def _receive_rest(self, first: bytes) -> bytes:
        parts = [first]
        total = len(first)
        more = True
        while more:
            more, plain = await self._receive_frame(total, first=False)
            parts.append(plain)
            total += len(plain)
        self._reserve(total)  # the joined copy, while the frames still exist
        return b"".join(parts)

    async def _receive_frame(self, so_far: int, *, first: bool) -> tuple[bool, bytes]:
        """One frame: (more frames follow, plaintext). Its size is checked against the
        limits and reserved in the budget before its body is read."""
        header = await self._reader.read(FRAME_HEADER.size)
        self._mid_message = True
        if header is None:
            if not first:
                raise ProtocolError("connection closed inside a multi-frame message")
            raise ConnectionClosed("the peer closed the channel")
        (word,) = FRAME_HEADER.unpack(header)
        size = word & _LEN_MASK
        if not TAGLEN <= size <= self._config.max_frame_size + TAGLEN:
            raise ProtocolError(
                f"frame length {size} outside 16..{self._config.max_frame_size + TAGLEN}"
            )
        if so_far + size - TAGLEN > self._config.max_message_size:
            raise ProtocolError(
                f"message exceeds max_message_size ({so_far + size - TAGLEN} bytes so far)"
            )
        more = bool(word & _MORE)
        counted = more or not first  # a message of one frame is bounded by max_frame_size
        if counted:
            self._reserve(size)
        body = await self._reader.read(size)
        if body is None:
            raise ProtocolError("connection closed between a frame header and its body")
        try:
            plain = self._recv_cipher.decrypt_with_ad(header, body)
        except HandshakeError as exc:
            raise ProtocolError(
                "frame failed authentication (tampered, replayed or reordered)"
            ) from exc
        if counted:
            self._unreserve(TAGLEN)  # the ciphertext is dropped; its plaintext stays counted
        self.last_activity = trio.current_time()
        return more, plain

    def _reserve(self, n: int) -> None:
        budget = self._budget
        if budget is None:
            return
        if not budget.try_reserve(n):
            raise LimitExceeded(
                f"message refused: {self._charged + n} bytes would pass the receive budget "
                f"({budget.in_use} of {budget.limit} bytes in use by messages being received)"
            )
        self._charged += n

    def _release_charge(self) -> None:
        if self._budget is not None and self._charged:
            self._budget.release(self._charged)
        self._charged = 0

    def _unreserve(self, n: int) -> None:
        if self._budget is not None:
            self._budget.release(n)
            self._charged -= n

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
