"""Peer identity, the Noise handshake, encrypted frames, message schemas, tensor codec, RPC."""

from swarm.net.channel import ReceiveBudget, SecureChannel
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.handshake import open_channel, secure_inbound, secure_outbound
from swarm.net.messages import (
    PROTOCOL_VERSION,
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    PushRequest,
    PushTarget,
    bounded,
    decode_message,
    encode_message,
    message,
)
from swarm.net.pool import ConnectionPool, PoolStatistics, open_connection_pool
from swarm.net.rpc import CallContext, RpcConnection, RpcStatistics, RpcStream, stream_handler
from swarm.net.rpc_server import RpcServer, RpcServerStatistics
from swarm.net.swarm_key import create_swarm_key, load_swarm_key
from swarm.net.tensors import decode_tensor, encode_tensor
from swarm.net.transport import TCPTransport, Transport

__all__ = [
    "DEFAULT_NET_CONFIG",
    "PROTOCOL_VERSION",
    "CallContext",
    "ConnectionPool",
    "ErrorResponse",
    "ForwardRequest",
    "ForwardResponse",
    "InferenceOpen",
    "InferenceStep",
    "InferenceStepResult",
    "InfoRequest",
    "InfoResponse",
    "Message",
    "NetConfig",
    "PoolStatistics",
    "PushRequest",
    "PushTarget",
    "ReceiveBudget",
    "RpcConnection",
    "RpcServer",
    "RpcServerStatistics",
    "RpcStatistics",
    "RpcStream",
    "SecureChannel",
    "TCPTransport",
    "Transport",
    "bounded",
    "create_swarm_key",
    "decode_message",
    "decode_tensor",
    "encode_message",
    "encode_tensor",
    "load_swarm_key",
    "message",
    "open_channel",
    "open_connection_pool",
    "secure_inbound",
    "secure_outbound",
    "stream_handler",
]
