"""Private-swarm datagrams: every DHT datagram sealed with a key derived from the swarm key.

A sealed datagram is ``nonce (12 bytes) || ChaCha20-Poly1305(key, nonce, datagram, aad)``.
Nodes without the swarm key can neither read a datagram nor forge one that a member accepts;
a datagram that fails to open is dropped before kademlia sees it, so its sender never enters a
routing table. A captured datagram can be replayed by an outsider; that only repeats a store
of records that are signed and expire anyway, or a reply whose request id is no longer awaited.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SEAL_OVERHEAD", "DatagramSeal"]

_NONCE_BYTES = 12
_TAG_BYTES = 16
SEAL_OVERHEAD = _NONCE_BYTES + _TAG_BYTES
_INFO = b"swarm dht datagram key v1"
_AAD = b"swarm-dht-v1"


class DatagramSeal:
    """Seals and opens datagrams with a key derived (HKDF-SHA256) from a 32-byte swarm key."""

    def __init__(self, swarm_key: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(swarm_key)
        self._aead = ChaCha20Poly1305(key)

    def seal(self, datagram: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, datagram, _AAD)

    def open(self, sealed: bytes) -> bytes | None:
        """The plaintext, or None if the datagram was not sealed with our swarm key."""
        if len(sealed) < SEAL_OVERHEAD:
            return None
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _AAD)
        except InvalidTag:
            return None
