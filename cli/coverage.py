"""The command that would fill the blocks no online server covers (which blocks those are is
`swarm.directory.missing_ranges`'s to say)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.types import LayerRange

__all__ = ["fill_hint"]


def fill_hint(gaps: Sequence[LayerRange], model: str, initial_peers: Sequence[str]) -> str:
    """``no online server covers blocks 4:8; start one: swarm serve MODEL --layers 4:8 ...``."""
    blocks = ", ".join(f"{gap.start}:{gap.stop}" for gap in gaps)
    peers = " ".join(f"--initial-peers {p}" for p in initial_peers) or "--initial-peers HOST:PORT"
    first = gaps[0]
    return (
        f"no online server covers blocks {blocks}; start one with "
        f"`swarm serve {model} --layers {first.start}:{first.stop} {peers}`"
    )
