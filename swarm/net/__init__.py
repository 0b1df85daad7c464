"""Peer identity, the Noise handshake, encrypted frames, message schemas, tensor codec, RPC
(the server's methods and their stubs: `swarm.net.surface`)."""

from swarm.net.channel import ReceiveBudget, SecureChannel
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.handshake import open_channel, secure_inbound, secure_outbound
from swarm.net.messages import (
    PROTOCOL_VERSION,
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceInput,
    InferenceOpen,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    NewPusher,
    NewPushTarget,
    PushRequest,
    PushTarget,
    bounded,
    decode_message,
    encode_message,
    message,
)
from swarm.net.methods import HandlerRegistry, OneWay, Streaming, TypedStream, Unary
from swarm.net.pool import ConnectionPool, PoolStatistics, open_connection_pool
from swarm.net.rpc import CallContext, RpcConnection, RpcStatistics, RpcStream
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
    "HandlerRegistry",
    "InferenceInput",
    "InferenceOpen",
    "InferenceStepResult",
    "InfoRequest",
    "InfoResponse",
    "Message",
    "NetConfig",
    "NewPushTarget",
    "NewPusher",
    "OneWay",
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
    "Streaming",
    "TCPTransport",
    "Transport",
    "TypedStream",
    "Unary",
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
]
