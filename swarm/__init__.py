"""swarm: run large language models across many independent GPUs, and check the peers.

The public API lives here; everything under the subpackages may change. Importing swarm
has no side effects and does not import torch until a model class is used.
"""

from __future__ import annotations

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
from swarm.shards.ranges import LayerRange

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DHTError",
    "FraudDetected",
    "HandshakeError",
    "LayerRange",
    "LimitExceeded",
    "ProtocolError",
    "RemoteError",
    "RoutingError",
    "SessionError",
    "ShardError",
    "SwarmError",
    "TransportError",
    "VerificationError",
    "__version__",
]
