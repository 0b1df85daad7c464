"""Helpers for the net tests: identities and in-memory channel pairs."""

from __future__ import annotations

import trio
import trio.testing

from swarm.identity import Identity
from swarm.net.channel import ReceiveBudget, SecureChannel
from swarm.net.config import NetConfig
from swarm.net.handshake import secure_inbound, secure_outbound

ALICE = Identity.from_seed(b"alice")
BOB = Identity.from_seed(b"bob")


async def channel_pair(
    a_stream: trio.abc.Stream | None = None,
    b_stream: trio.abc.Stream | None = None,
    *,
    config: NetConfig | None = None,
    receive_budget: ReceiveBudget | None = None,
) -> tuple[SecureChannel, SecureChannel]:
    """(alice's outbound channel to bob, bob's inbound channel from alice); bob's side
    draws on ``receive_budget`` if one is given."""
    if a_stream is None or b_stream is None:
        a_stream, b_stream = trio.testing.memory_stream_pair()
    config = config or NetConfig()
    result: dict[str, SecureChannel] = {}

    async def inbound() -> None:
        result["b"] = await secure_inbound(
            b_stream, BOB, config=config, receive_budget=receive_budget
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inbound)
            result["a"] = await secure_outbound(a_stream, ALICE, config=config)
    return result["a"], result["b"]


async def tcp_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(a dialed TCP stream, the one accepted for it) over loopback."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        dialed = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    return dialed, accepted[0]
