"""The model: config parsing, Llama-family blocks, loading a layer range, KV caches, the head."""

from swarm.shards.cache import KVCache
from swarm.shards.checkpoint import model_id
from swarm.shards.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from swarm.shards.head import Head, load_head
from swarm.shards.span import Span, load_span

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Head",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Span",
    "load_head",
    "load_span",
    "model_id",
]
