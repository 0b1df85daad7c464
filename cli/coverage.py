"""Which blocks of a model no online server covers, and the command that would fill them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["Announced", "fill_hint", "missing_ranges"]


class _Range(Protocol):
    @property
    def start(self) -> int: ...

    @property
    def stop(self) -> int: ...


class Announced(Protocol):
    """What this module reads of a server (`swarm.client` server views have it)."""

    @property
    def layers(self) -> _Range: ...

    @property
    def state(self) -> str: ...


def missing_ranges(servers: Sequence[Announced], num_layers: int) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` runs of blocks that no ``online`` server covers."""
    covered = [False] * num_layers
    for server in servers:
        if server.state == "online":
            for block in range(max(0, server.layers.start), min(num_layers, server.layers.stop)):
                covered[block] = True
    gaps: list[tuple[int, int]] = []
    for block, ok in enumerate(covered):
        if ok:
            continue
        if gaps and gaps[-1][1] == block:
            gaps[-1] = (gaps[-1][0], block + 1)
        else:
            gaps.append((block, block + 1))
    return gaps


def fill_hint(gaps: Sequence[tuple[int, int]], model: str, initial_peers: Sequence[str]) -> str:
    """``no online server covers blocks 4:8; start one: swarm serve MODEL --layers 4:8 ...``."""
    blocks = ", ".join(f"{a}:{b}" for a, b in gaps)
    peers = " ".join(f"--initial-peers {p}" for p in initial_peers) or "--initial-peers HOST:PORT"
    first = gaps[0]
    return (
        f"no online server covers blocks {blocks}; start one with "
        f"`swarm serve {model} --layers {first[0]}:{first[1]} {peers}`"
    )
