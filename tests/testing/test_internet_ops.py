"""DHT operations through another process's nodes (`swarm.testing.internet_ops`), both ends
in one process over an in-memory stream: what comes back is what the node itself read, a
close cancels what was under way through the node, and a closed node answers nothing more."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from swarm.directory import block_key, servers_from_records
from swarm.errors import DHTError
from swarm.net.messages import ServerAnnouncement
from swarm.testing.internet_ops import Frames, OpChannel, RemoteNode, serve_ops
from swarm.testing.internet_plane import MODEL, DHTSlice
from swarm.types import LayerRange, ServerState


async def test_operations_through_a_workers_node_are_the_nodes_own_and_end_when_it_closes() -> None:
    plane = DHTSlice(
        seed=5, name="ops-", intra=(0.001, 0.002), inter=(0.002, 0.004), loss=0.0, ttl=10.0,
        blocks=2,
    )  # fmt: skip
    try:
        with trio.fail_after(60):
            await plane.open(5)
        ours, theirs = trio.testing.memory_stream_pair()
        channel = OpChannel(ours)

        def remote(index: int) -> RemoteNode:
            node = plane.nodes[index]
            return RemoteNode(channel, 1, index, node.peer_id, node.port)

        announcer, reader = remote(1), remote(2)
        keys = [block_key(MODEL, 0), block_key(MODEL, 1)]
        value = ServerAnnouncement(
            host="127.0.0.1", port=announcer.port, layer_range=LayerRange(0, 2),
            state=ServerState.ONLINE, dtype="float32", throughput=10.0, free_cache_tokens=100,
            active_sessions=0, version="test",
        ).to_wire()  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_ops, Frames(theirs), plane.nodes, plane.stacks)
            nursery.start_soon(channel.run)
            with trio.fail_after(60):
                await announcer.announce_many(keys, value, 10.0)
                found = await reader.get_many(keys)
                own = await plane.nodes[2].get_many(keys)
                one = await reader.get(keys[0])
            # the records the worker's node accepted, field for field, as the node has them
            assert found == own
            assert set(found[keys[0]]) == {announcer.peer_id}
            assert one == own[keys[0]]
            views = servers_from_records(found, MODEL, 2)  # the strict decoder takes them
            assert [(v.peer_id, v.layers) for v in views] == [(announcer.peer_id, LayerRange(0, 2))]
            with trio.fail_after(30):
                await announcer.aclose()
                with pytest.raises(DHTError, match="closed"):
                    await announcer.get(keys[0])
                assert await reader.get(keys[1])  # the others still answer
            for node in plane.nodes:  # every datagram lost: a lookup waits out its timeouts
                plane.links.silence(("127.0.0.1", node.port))

            async def look() -> None:
                with pytest.raises(DHTError, match="closed meanwhile"):
                    await reader.get(keys[0])

            with trio.fail_after(30):
                async with trio.open_nursery() as looking:
                    looking.start_soon(look)
                    await trio.testing.wait_all_tasks_blocked()  # the lookup is under way
                    await reader.aclose()  # ... and cancelled by the close, as a local one
            nursery.cancel_scope.cancel()
    finally:
        await plane.aclose()


def test_the_loop_lag_counts_how_long_a_busy_loop_kept_its_timers_waiting() -> None:
    import asyncio
    import time

    from swarm.testing.internet_plane import LoopLag

    lag = LoopLag(interval=0.01)

    async def busy() -> None:
        lag.install()
        await asyncio.sleep(0.05)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # busy: the loop runs nothing else meanwhile
            pass
        await asyncio.sleep(0.05)

    asyncio.run(busy())
    assert lag.samples, "no timer ran"
    assert max(lag.samples) >= 0.25  # the tick due during the block ran that late
    p50, p99 = lag.percentiles_ms()
    assert p99 >= 250 > p50
