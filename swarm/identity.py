"""Peer identity: an Ed25519 key pair per peer, and the `PeerId` it proves.

Both the wire (handshake payloads) and the DHT (signed records) need it, so it sits at the
bottom of the import order beside `swarm.types`.

The private key is stored as PKCS#8 PEM with file mode 0600. A key file that group or
others can read is refused: a leaked key lets anyone impersonate the peer.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from swarm.errors import IdentityError
from swarm.types import PeerId

__all__ = [
    "DEFAULT_IDENTITY_PATH",
    "Identity",
    "public_key_from_bytes",
    "verify_signature",
]

DEFAULT_IDENTITY_PATH = Path("~/.config/swarm/identity.key")


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Load a raw 32-byte Ed25519 public key; raises ValueError if it is not one."""
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    try:
        public_key_from_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 key pair and the `PeerId` it proves."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity, kept only in memory."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (tests and benchmarks)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str] | None = None) -> Identity:
        """Read the key at `path` (default ``~/.config/swarm/identity.key``), creating it
        with mode 0600 if it does not exist.

        Raises `IdentityError` if the file is readable by group or others, or is not an
        Ed25519 private key.
        """
        key_path = Path(path if path is not None else DEFAULT_IDENTITY_PATH).expanduser()
        if not key_path.exists():
            identity = cls.generate()
            identity.save(key_path)
            return identity
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"identity key {key_path} is readable by other users (mode {mode:o}); "
                f"run `chmod 600 {key_path}` or delete it to create a new identity"
            )
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise IdentityError(f"cannot read identity key {key_path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity key {key_path} is not an Ed25519 private key")
        return cls(key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as PEM with mode 0600 (parent folders mode 0700)."""
        key_path = Path(path).expanduser()
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of `message`."""
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id!r})"
