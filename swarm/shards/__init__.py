"""The model: config parsing, Llama-family blocks, loading a layer range, KV caches, the head."""

from swarm.shards.ranges import LayerRange

__all__ = ["LayerRange"]
