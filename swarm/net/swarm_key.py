"""Private-swarm keys: 32 random bytes shared by every peer of a private swarm.

The file holds the key as 64 hex characters (one line). Peers without the key cannot
complete a Noise handshake (XXpsk3) or exchange DHT datagrams with the swarm.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from swarm.errors import IdentityError

__all__ = ["SWARM_KEY_SIZE", "create_swarm_key", "load_swarm_key"]

SWARM_KEY_SIZE = 32


def create_swarm_key(path: str | os.PathLike[str]) -> bytes:
    """Write a new random swarm key to `path` (mode 0600) and return it."""
    key = secrets.token_bytes(SWARM_KEY_SIZE)
    key_path = Path(path).expanduser()
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def load_swarm_key(path: str | os.PathLike[str]) -> bytes:
    """Read a swarm key file. Raises `IdentityError` if it is missing, malformed, or
    readable by other users."""
    key_path = Path(path).expanduser()
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        text = key_path.read_text().strip()
    except OSError as exc:
        raise IdentityError(f"cannot read swarm key {key_path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise IdentityError(
            f"swarm key {key_path} is readable by other users (mode {mode:o}); "
            f"run `chmod 600 {key_path}`"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise IdentityError(f"swarm key {key_path} is not hex") from exc
    if len(key) != SWARM_KEY_SIZE:
        raise IdentityError(
            f"swarm key {key_path} holds {len(key)} bytes; expected {SWARM_KEY_SIZE}"
        )
    return key
