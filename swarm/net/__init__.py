"""Peer identity, the Noise handshake, encrypted frames, message schemas, tensor codec, RPC."""

from swarm.net.identity import Identity, PeerId

__all__ = ["Identity", "PeerId"]
