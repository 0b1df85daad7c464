"""swarm: run large language models across many independent GPUs, and check the peers.

The public API lives here; everything under the subpackages may change. Importing swarm
has no side effects and does not import torch: the model-facing names (`LayerRange`,
`RemoteModel`, `Server`, ...) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from swarm._version import __version__
from swarm.errors import (
    ConfigError,
    DHTError,
    FraudDetected,
    HandshakeError,
    LimitExceeded,
    ProtocolError,
    RemoteError,
    RoutingError,
    SessionError,
    ShardError,
    SwarmError,
    TransportError,
    VerificationError,
)

if TYPE_CHECKING:
    from swarm.client.config import ClientConfig
    from swarm.client.model import AsyncRemoteModel
    from swarm.client.remote import RemoteModel
    from swarm.server.config import ServerConfig
    from swarm.server.server import Server
    from swarm.types import LayerRange


_LAZY = {
    "AsyncRemoteModel": "swarm.client.model",
    "ClientConfig": "swarm.client.config",
    "LayerRange": "swarm.types",
    "RemoteModel": "swarm.client.remote",
    "Server": "swarm.server.server",
    "ServerConfig": "swarm.server.config",
}

__all__ = [
    "AsyncRemoteModel",
    "ClientConfig",
    "ConfigError",
    "DHTError",
    "FraudDetected",
    "HandshakeError",
    "LayerRange",
    "LimitExceeded",
    "ProtocolError",
    "RemoteError",
    "RemoteModel",
    "RoutingError",
    "Server",
    "ServerConfig",
    "SessionError",
    "ShardError",
    "SwarmError",
    "TransportError",
    "VerificationError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
