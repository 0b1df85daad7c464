"""DHT operations across the internet simulation's processes: the coordinator's servers,
clients and probes act through DHT nodes that worker processes host.

In a Kademlia swarm the node that starts a store or a lookup does far more work than the
nodes that answer (it crawls, runs a query per contact, and checks every record it reads),
so the processes that host the initiating nodes are the busy ones. With
``SimConfig.processes`` > 1 the coordinator (`swarm.testing.internet`) keeps the logic
(planning, sleeps, decisions, churn, the truth) and hands each DHT operation to the process
that hosts the node it goes through: a `SimNode` is either one of the coordinator's own
(`LocalNode`) or a `RemoteNode` in a worker (`swarm.testing.internet_workers`), and the
simulation spreads its servers, clients and probes over both in proportion to the nodes
each process hosts.

Operations (`Op`): ``announce`` (sign a value and store it under some keys through node
``i``), ``get`` and ``get_many`` (look keys up through node ``i``, returning the records it
accepted), ``close`` (node ``i``'s socket closes: a server's abrupt death; the operations
in flight through it are cancelled, as a local node's are).

Where the checks run: the worker's node checks every record it reads as any reader does
(`swarm.dht.DHTNode.get`: signature, key binding, expiry, TTL), and the records it accepted
come back with their fields (no second signature check); the coordinator then decodes their
values with the real strict decoder (`swarm.directory.servers_from_records`) and counts
forgeries exactly as it does for its own nodes' reads.

Wire: one Unix socketpair per worker; frames of a 4-byte big-endian length and a msgpack
body. A request is ``[call_id, op, node_index, *args]``; an answer ``[call_id, error,
result]`` (``error`` None or a message). Frames are queued and written whole by one task
per side, so a cancelled caller never leaves half a frame on the stream. Every call has a
deadline on both sides (`OP_TIMEOUT`); an answer after its caller gave up is dropped.
"""

from __future__ import annotations

import enum
import logging
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, Protocol

import msgpack
import trio

from swarm.dht import DHTNode, Record
from swarm.errors import DHTError, SwarmError
from swarm.types import PeerId

__all__ = ["OP_TIMEOUT", "Frames", "LocalNode", "Op", "OpChannel", "RemoteNode", "SimNode"]

log = logging.getLogger(__name__)

OP_TIMEOUT = 60.0  # seconds an operation may take in the worker (the coordinator waits 5 more)
_CALLER_SLACK = 5.0
_MAX_FRAME = 64 << 20
_HEADER = struct.Struct(">I")


class Op(enum.StrEnum):
    """The operations a worker runs on its nodes for the coordinator."""

    ANNOUNCE = "announce"  # (keys, value, ttl) -> acks per key
    GET = "get"  # (key) -> records
    GET_MANY = "get_many"  # (keys) -> {key: records}
    CLOSE = "close"  # () -> None


class SimNode(Protocol):
    """A DHT node the simulation acts through, wherever it lives."""

    @property
    def peer_id(self) -> PeerId: ...

    @property
    def port(self) -> int: ...

    @property
    def process(self) -> int:
        """Which process hosts it: 0 the coordinator, k its worker k."""

    async def announce_many(
        self, keys: Sequence[str], value: Mapping[str, Any], ttl: float
    ) -> None:
        """Sign ``value`` and store it under each of ``keys`` (concurrently)."""

    async def get(self, key: str) -> dict[PeerId, Record]: ...

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[PeerId, Record]]: ...

    async def aclose(self) -> None:
        """Close the node's socket (its records stay on other nodes until they expire)."""


class LocalNode:
    """A `SimNode` in this process: a `DHTNode` and the stack that closes it."""

    def __init__(self, node: DHTNode, stack: AsyncExitStack) -> None:
        self.node = node
        self._stack = stack

    @property
    def peer_id(self) -> PeerId:
        return self.node.peer_id

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def process(self) -> int:
        return 0

    async def announce_many(
        self, keys: Sequence[str], value: Mapping[str, Any], ttl: float
    ) -> None:
        await _announce_many(self.node, keys, value, ttl)

    async def get(self, key: str) -> dict[PeerId, Record]:
        return await self.node.get(key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[PeerId, Record]]:
        return await self.node.get_many(keys)

    async def aclose(self) -> None:
        await self._stack.aclose()


async def _announce_many(
    node: DHTNode, keys: Sequence[str], value: Mapping[str, Any], ttl: float
) -> list[int]:
    acks = [0] * len(keys)

    async def one(i: int) -> None:
        acks[i] = await node.announce(keys[i], value, ttl)

    async with trio.open_nursery() as nursery:
        for i in range(len(keys)):
            nursery.start_soon(one, i)
    return acks


def _pack_records(records: Mapping[PeerId, Record]) -> list[list[Any]]:
    return [
        [r.key, r.peer_id.digest, r.public_key, r.value, r.expires_at, r.seq, r.encoded]
        for r in records.values()
    ]


def _unpack_records(rows: Sequence[Sequence[Any]]) -> dict[PeerId, Record]:
    """The records a worker's node accepted (already checked there; see the module doc)."""
    found: dict[PeerId, Record] = {}
    for key, peer, public_key, value, expires_at, seq, encoded in rows:
        record = Record(key, PeerId(peer), public_key, value, expires_at, seq, encoded)
        found[record.peer_id] = record
    return found


class Frames:
    """Length-prefixed msgpack frames over a stream: `send` queues a whole frame (never
    blocks, never splits one), `run_sender` writes them; `receive` reads the next one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._out, self._queued = trio.open_memory_channel[bytes](math.inf)
        self._buffer = bytearray()

    def send(self, obj: object) -> None:
        body = msgpack.packb(obj, use_bin_type=True)
        self._out.send_nowait(_HEADER.pack(len(body)) + body)

    async def run_sender(self) -> None:
        async for frame in self._queued:
            await self._stream.send_all(frame)

    async def receive(self) -> Any:
        """The next frame's object. Raises `DHTError` when the stream ends."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size > _MAX_FRAME:
                    raise DHTError(f"a simulation frame of {size} bytes")
                end = _HEADER.size + size
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[_HEADER.size : end])
                    del self._buffer[:end]
                    return msgpack.unpackb(body, raw=False)
            chunk = await self._stream.receive_some(1 << 20)
            if not chunk:
                raise DHTError("the simulation's operation stream closed")
            self._buffer += chunk


class OpChannel:
    """The coordinator's end of one worker's operation stream: `call` sends a request and
    waits for its answer; `run` (in a nursery, for as long as calls are made) writes the
    requests and hands each answer to its caller."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._frames = Frames(stream)
        self._next_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[tuple[str | None, Any]]] = {}
        self._closed: str | None = None

    async def call(self, op: Op, index: int, *args: object) -> Any:
        """Run ``op`` on the worker's node ``index``. Raises `DHTError` when it failed there,
        took longer than `OP_TIMEOUT`, or the worker is gone."""
        if self._closed is not None:
            raise DHTError(self._closed)
        call_id, self._next_id = self._next_id, self._next_id + 1
        send, receive = trio.open_memory_channel[tuple[str | None, Any]](1)
        self._waiting[call_id] = send
        try:
            self._frames.send([call_id, op.value, index, *args])
            with trio.move_on_after(OP_TIMEOUT + _CALLER_SLACK):
                error, result = await receive.receive()
                if error is not None:
                    raise DHTError(f"{op} through a worker's node: {error}")
                return result
            raise DHTError(f"{op} through a worker's node: no answer in {OP_TIMEOUT} s")
        finally:
            self._waiting.pop(call_id, None)  # (gone already when answered)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._frames.run_sender)
            try:
                while True:
                    call_id, error, result = await self._frames.receive()
                    waiting = self._waiting.pop(call_id, None)
                    if waiting is not None:  # else its caller gave up
                        waiting.send_nowait((error, result))
            except DHTError as exc:
                self._closed = str(exc)
                for waiting in self._waiting.values():  # the calls still unanswered
                    waiting.send_nowait((self._closed, None))
                self._waiting.clear()
            nursery.cancel_scope.cancel()


class RemoteNode:
    """A `SimNode` that worker ``process`` hosts (its ``index`` there), reached through
    ``channel``."""

    def __init__(
        self, channel: OpChannel, process: int, index: int, peer_id: PeerId, port: int
    ) -> None:
        self._channel = channel
        self._process = process
        self.index = index
        self._peer_id = peer_id
        self._port = port

    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    @property
    def port(self) -> int:
        return self._port

    @property
    def process(self) -> int:
        return self._process

    async def announce_many(
        self, keys: Sequence[str], value: Mapping[str, Any], ttl: float
    ) -> None:
        await self._channel.call(Op.ANNOUNCE, self.index, list(keys), dict(value), ttl)

    async def get(self, key: str) -> dict[PeerId, Record]:
        return _unpack_records(await self._channel.call(Op.GET, self.index, key))

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[PeerId, Record]]:
        found = await self._channel.call(Op.GET_MANY, self.index, list(dict.fromkeys(keys)))
        return {key: _unpack_records(rows) for key, rows in found.items()}

    async def aclose(self) -> None:
        await self._channel.call(Op.CLOSE, self.index)


async def serve_ops(
    frames: Frames, nodes: Sequence[DHTNode], stacks: Sequence[AsyncExitStack]
) -> None:
    """Answer the coordinator's operations on ``nodes`` (closed through ``stacks``) until the
    stream ends or this is cancelled; each runs in its own task under `OP_TIMEOUT`."""
    running: dict[int, set[trio.CancelScope]] = {}
    closed: set[int] = set()

    async def run(op: Op, index: int, args: Sequence[Any]) -> Any:
        node = nodes[index]
        if op is Op.ANNOUNCE:
            keys, value, ttl = args
            return await _announce_many(node, keys, value, ttl)
        if op is Op.GET:
            return _pack_records(await node.get(args[0]))
        if op is Op.GET_MANY:
            found = await node.get_many(args[0])
            return {key: _pack_records(records) for key, records in found.items()}
        raise DHTError(f"unknown operation {op}")

    async def answer(call_id: int, op: Op, index: int, args: Sequence[Any]) -> None:
        if op is Op.CLOSE:
            if index not in closed:
                closed.add(index)
                for scope in running.pop(index, set()):
                    scope.cancel()
                try:
                    await stacks[index].aclose()
                except SwarmError as exc:
                    frames.send([call_id, f"closing: {type(exc).__name__}: {exc}", None])
                    return
            frames.send([call_id, None, None])
            return
        if index in closed:
            frames.send([call_id, "the node is closed", None])
            return
        error: str | None = None
        result: Any = None
        with trio.CancelScope() as closing:
            running.setdefault(index, set()).add(closing)
            try:
                with trio.move_on_after(OP_TIMEOUT) as deadline:
                    result = await run(op, index, args)
                if deadline.cancelled_caught:
                    error = f"took longer than {OP_TIMEOUT} s"
            except SwarmError as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                running.get(index, set()).discard(closing)
        if closing.cancelled_caught:
            error = "the node was closed meanwhile"
        frames.send([call_id, error, result])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(frames.run_sender)
        try:
            while True:
                call_id, op, index, *args = await frames.receive()
                nursery.start_soon(answer, call_id, Op(op), index, args)
        except DHTError:
            log.info("the coordinator's operation stream closed")
        nursery.cancel_scope.cancel()
