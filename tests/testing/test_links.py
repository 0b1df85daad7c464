"""The link emulator delays both directions of dialed streams, and keeps byte order."""

from __future__ import annotations

import trio

from swarm.net.transport import TCPTransport
from swarm.testing.links import LinkEmulator, LinkSpec


async def echo(stream: trio.abc.Stream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def round_trip(stream: trio.abc.Stream, payload: bytes) -> tuple[float, bytes]:
    start = trio.current_time()
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        got += await stream.receive_some(65536)
    return trio.current_time() - start, got


async def test_round_trip_is_twice_the_one_way_delay() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(TCPTransport().serve, echo, "127.0.0.1", 0)
        address = f"127.0.0.1:{port}"
        async with LinkEmulator(seed=1) as links:
            links.set("client", address, LinkSpec(delay=0.03))
            slow = await links.transport("client").connect("127.0.0.1", port)
            fast = await links.transport("other").connect("127.0.0.1", port)
            with trio.fail_after(5):
                slow_rtt, got = await round_trip(slow, b"hello")
                fast_rtt, _ = await round_trip(fast, b"hello")
            assert got == b"hello"
            assert slow_rtt >= 0.06
            assert fast_rtt < slow_rtt
            await slow.aclose()
            await fast.aclose()
        nursery.cancel_scope.cancel()


async def test_jitter_and_loss_keep_order() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(TCPTransport().serve, echo, "127.0.0.1", 0)
        async with LinkEmulator(
            LinkSpec(delay=0.001, jitter=0.005, loss=0.2, retransmit=0.01), seed=3
        ) as links:
            stream = await links.transport("c").connect("127.0.0.1", port)
            payload = bytes(range(256)) * 40
            with trio.fail_after(10):
                for i in range(0, len(payload), 512):
                    await stream.send_all(payload[i : i + 512])
                got = b""
                while len(got) < len(payload):
                    got += await stream.receive_some(65536)
            assert got == payload
            await stream.aclose()
        nursery.cancel_scope.cancel()
