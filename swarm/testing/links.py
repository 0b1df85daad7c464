"""Link emulation: one-way delay, jitter and loss on the links between peers, for the
RPC plane (TCP streams, `LinkEmulator`) and the DHT plane (UDP datagrams,
`DatagramLinkEmulator`).

These machines have no traffic shaping, so tests and benchmarks give distance to a swarm
running on loopback by wrapping the streams a peer *dials*. Both directions are delayed at
the dialing side (bytes sent are released after the delay; bytes received are held for the
delay before the reader sees them), so the listening peer needs no wrapping and the round
trip is twice the one-way delay. Loss on a TCP link shows up as a retransmission stall, so
a "lost" chunk is delivered after an extra `LinkSpec.retransmit` delay; order is kept.

    async with LinkEmulator(default=LinkSpec(delay=0.025)) as links:
        links.set("server-a", "127.0.0.1:4012", LinkSpec(delay=0.002))
        transport = links.transport("server-a")   # give this to the peer named server-a
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from swarm.net.transport import StreamHandler, TCPTransport, Transport

__all__ = ["DatagramLinkEmulator", "DelayedStream", "LinkEmulator", "LinkSpec"]

_SPECS_REMEMBERED = 1 << 20  # (source, target) pairs whose spec a datagram emulator keeps


@dataclass(frozen=True)
class LinkSpec:
    """One direction's behaviour of a link (the same for both directions)."""

    delay: float = 0.0  # one-way seconds
    jitter: float = 0.0  # seconds, uniform in [0, jitter], order kept
    loss: float = 0.0  # probability a chunk is "lost" and retransmitted
    retransmit: float = 0.2  # seconds a lost chunk is stalled (TCP's minimum RTO)

    def sample(self, rng: random.Random) -> float:
        extra = rng.uniform(0.0, self.jitter) if self.jitter else 0.0
        if self.loss and rng.random() < self.loss:
            extra += self.retransmit
        return self.delay + extra


class DelayedStream(trio.abc.Stream):
    """A stream whose bytes, in both directions, arrive `spec` later than they would."""

    def __init__(
        self, inner: trio.abc.Stream, spec: LinkSpec, nursery: trio.Nursery, rng: random.Random
    ) -> None:
        self._inner = inner
        self._spec = spec
        self._rng = rng
        self._out_send, out_recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        in_send, self._in_recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._buffer = b""
        self._last_out = self._last_in = 0.0
        self._scope = trio.CancelScope()
        nursery.start_soon(self._pumps, out_recv, in_send)

    def _due(self, last: float) -> float:
        return max(trio.current_time() + self._spec.sample(self._rng), last)

    async def _pumps(
        self,
        out_recv: trio.MemoryReceiveChannel[tuple[float, bytes]],
        in_send: trio.MemorySendChannel[tuple[float, bytes]],
    ) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_out, out_recv)
                nursery.start_soon(self._pump_in, in_send)

    async def _pump_out(self, out_recv: trio.MemoryReceiveChannel[tuple[float, bytes]]) -> None:
        async for due, data in out_recv:
            await trio.sleep_until(due)
            try:
                await self._inner.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _pump_in(self, in_send: trio.MemorySendChannel[tuple[float, bytes]]) -> None:
        async with in_send:
            while True:
                try:
                    data = await self._inner.receive_some(1 << 20)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                self._last_in = self._due(self._last_in)
                await in_send.send((self._last_in, bytes(data)))
                if not data:
                    return

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._last_out = self._due(self._last_out)
        await self._out_send.send((self._last_out, bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._buffer:
            try:
                due, data = await self._in_recv.receive()
            except trio.EndOfChannel:
                return b""
            await trio.sleep_until(due)
            self._buffer = data
        n = len(self._buffer) if max_bytes is None else max_bytes
        chunk, self._buffer = self._buffer[:n], self._buffer[n:]
        return chunk

    async def aclose(self) -> None:
        self._scope.cancel()
        self._out_send.close()
        await self._inner.aclose()


class LinkEmulator:
    """Per-link delays for the streams that named peers dial.

    Links are keyed by (name of the dialing peer, "host:port" dialed); unknown links use
    `default`. Use as an async context manager: it owns the tasks that carry the bytes.
    """

    def __init__(self, default: LinkSpec | None = None, *, seed: int = 0) -> None:
        self.default = default or LinkSpec()
        self._links: dict[tuple[str, str], LinkSpec] = {}
        self._rng = random.Random(seed)
        self._nursery: trio.Nursery | None = None

    def set(self, dialer: str, address: str, spec: LinkSpec) -> None:
        """Give the link from peer `dialer` to `address` ("host:port") its behaviour."""
        self._links[(dialer, address)] = spec

    def spec(self, dialer: str, address: str) -> LinkSpec:
        return self._links.get((dialer, address), self.default)

    def transport(self, name: str, inner: Transport | None = None) -> Transport:
        """A transport for the peer `name` whose dialed links follow this emulator."""
        return _EmulatedTransport(self, name, inner or TCPTransport())

    def wrap(self, stream: trio.abc.Stream, dialer: str, address: str) -> trio.abc.Stream:
        if self._nursery is None:
            raise RuntimeError("use LinkEmulator as `async with LinkEmulator(...) as links`")
        spec = self.spec(dialer, address)
        if spec == LinkSpec():
            return stream
        return DelayedStream(stream, spec, self._nursery, self._rng)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[LinkEmulator]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def __aenter__(self) -> LinkEmulator:
        self._cm = self._run()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: object) -> bool | None:
        return await self._cm.__aexit__(*exc)  # type: ignore[arg-type]


class _EmulatedTransport:
    """Dials through the emulator; serves like the transport it wraps."""

    def __init__(self, links: LinkEmulator, name: str, inner: Transport) -> None:
        self._links, self._name, self._inner = links, name, inner

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        stream = await self._inner.connect(host, port)
        return self._links.wrap(stream, self._name, f"{host}:{port}")

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._inner.serve(handler, host, port, task_status=task_status)


class DatagramLinkEmulator:
    """Per-link one-way delay, jitter and loss for DHT datagrams (a `swarm.dht.DatagramLinks`).

    Give it to each node: ``DHTNode.open(identity, config, links=emulator)``. A link's spec
    is, first, one set for that (source, target) pair; else the one between the regions
    the two addresses were `place`d in; else `default`. A datagram is lost with the spec's
    ``loss`` (UDP does not retransmit; kademlia's RPC timeout and retry see it) and
    otherwise held ``delay`` plus up to ``jitter`` seconds (datagrams may overtake each
    other, as on the internet). Counts what each source sent, for per-node traffic figures.
    Called on the DHT loop thread only.
    """

    def __init__(
        self,
        default: LinkSpec | None = None,
        *,
        seed: int = 0,
        region_of: Callable[[tuple[str, int]], str | None] | None = None,
    ) -> None:
        self.default = default or LinkSpec()
        self._links: dict[tuple[tuple[str, int], tuple[str, int]], LinkSpec] = {}
        self._regions: dict[tuple[str, int], str] = {}
        # where an address not `place`d is (the same function in every process of a swarm
        # split across processes places every node alike without telling each other); it
        # must answer the same for an address every time: links' specs are remembered
        self._region_of = region_of
        self._between: dict[tuple[str, str], LinkSpec] = {}
        # each (source, target)'s spec as last worked out (cleared by set, place, set_between)
        self._specs: dict[tuple[tuple[str, int], tuple[str, int]], LinkSpec] = {}
        self._rng = random.Random(seed)
        self.sent: dict[tuple[str, int], list[int]] = {}  # source -> [datagrams, bytes]
        self.lost = 0
        self._silent: set[tuple[str, int]] = set()

    def silence(self, address: tuple[str, int]) -> None:
        """Lose every datagram the node at ``address`` sends (it answers nothing)."""
        self._silent.add(address)

    def set(self, source: tuple[str, int], target: tuple[str, int], spec: LinkSpec) -> None:
        """The behaviour of datagrams from ``source`` to ``target`` (one direction)."""
        self._links[(source, target)] = spec
        self._specs.clear()

    def place(self, address: tuple[str, int], region: str) -> None:
        """Put the node at ``address`` in ``region``."""
        self._regions[address] = region
        self._specs.clear()

    def _region(self, address: tuple[str, int]) -> str | None:
        region = self._regions.get(address)
        if region is None and self._region_of is not None:
            region = self._region_of(address)
        return region

    def set_between(self, a: str, b: str, spec: LinkSpec) -> None:
        """The behaviour of datagrams between regions ``a`` and ``b`` (both directions;
        ``a == b`` is the inside of a region)."""
        self._between[(a, b)] = self._between[(b, a)] = spec
        self._specs.clear()

    def spec(self, source: tuple[str, int], target: tuple[str, int]) -> LinkSpec:
        pair = (source, target)
        spec = self._specs.get(pair)
        if spec is None:
            if len(self._specs) >= _SPECS_REMEMBERED:
                self._specs.clear()
            spec = self._specs[pair] = self._work_out(source, target)
        return spec

    def _work_out(self, source: tuple[str, int], target: tuple[str, int]) -> LinkSpec:
        spec = self._links.get((source, target))
        if spec is not None:
            return spec
        a, b = self._region(source), self._region(target)
        if a is not None and b is not None:
            return self._between.get((a, b), self.default)
        return self.default

    def outgoing(self, source: tuple[str, int], target: tuple[str, int], size: int) -> float | None:
        counts = self.sent.setdefault(source, [0, 0])
        counts[0] += 1
        counts[1] += size
        spec = self.spec(source, target)
        if source in self._silent or (spec.loss and self._rng.random() < spec.loss):
            self.lost += 1
            return None
        return spec.delay + (self._rng.uniform(0.0, spec.jitter) if spec.jitter else 0.0)
