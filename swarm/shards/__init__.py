"""The model: config parsing, Llama-family blocks, loading a layer range (from a Hugging Face
folder or a GGUF file), KV caches, the head, the tokenizer, the chat template, the model id."""

from swarm.shards.cache import KVCache
from swarm.shards.chat_template import ChatTemplate, load_chat_template
from swarm.shards.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from swarm.shards.fingerprint import model_id
from swarm.shards.head import Head, load_head
from swarm.shards.quant import Quantization
from swarm.shards.span import Span, load_span, resolve_quantization
from swarm.shards.tokenizer import load_tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ChatTemplate",
    "Head",
    "KVCache",
    "ModelConfig",
    "Quantization",
    "RopeScaling",
    "Span",
    "load_chat_template",
    "load_head",
    "load_span",
    "load_tokenizer",
    "model_id",
    "resolve_quantization",
]
