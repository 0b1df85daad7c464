"""Which blocks of a model the online servers cover: the one owner of that question (the
gateway's health, ``swarm status``, ``swarm generate``'s wait all ask it here)."""

from __future__ import annotations

from collections.abc import Sequence

from swarm.directory.servers import ServerView
from swarm.types import LayerRange, ServerState

__all__ = ["missing_blocks", "missing_ranges", "servers_per_block"]


def servers_per_block(servers: Sequence[ServerView], num_layers: int) -> list[int]:
    """How many online servers cover each block ``0..num_layers``."""
    counts = [0] * num_layers
    for server in servers:
        if server.state == ServerState.ONLINE:
            for block in range(max(0, server.layers.start), min(num_layers, server.layers.stop)):
                counts[block] += 1
    return counts


def missing_blocks(servers: Sequence[ServerView], num_layers: int) -> list[int]:
    """Blocks no online server covers."""
    return [b for b, n in enumerate(servers_per_block(servers, num_layers)) if n == 0]


def missing_ranges(servers: Sequence[ServerView], num_layers: int) -> list[LayerRange]:
    """The runs of blocks no online server covers, as half-open ranges."""
    gaps: list[LayerRange] = []
    for block in missing_blocks(servers, num_layers):
        if gaps and gaps[-1].stop == block:
            gaps[-1] = LayerRange(gaps[-1].start, block + 1)
        else:
            gaps.append(LayerRange(block, block + 1))
    return gaps
