"""Small values every layer shares: `PeerId`, `LayerRange`, addresses, dtype names.

This is the bottom of the import order (DESIGN §2): it imports nothing of swarm but
`swarm.errors`, and no torch (`torch_dtype` imports it when first called).

- A `PeerId` is the SHA-256 of the raw 32-byte Ed25519 public key. Its text form is base58
  (Bitcoin alphabet), short enough for logs and the CLI; `.hex()` gives the long form.
- `LayerRange(start, stop)` is half-open, everywhere.
- Addresses are ``"host:port"`` text (``"[::1]:port"`` for IPv6): `parse_address`,
  `format_address`.
- Floating dtypes cross the wire and the command line by name: `FLOAT_DTYPES`, `torch_dtype`.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from swarm.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLOAT_DTYPES",
    "DtypeName",
    "LayerRange",
    "MoveReason",
    "PeerId",
    "QuantName",
    "Reachability",
    "ServerState",
    "b58decode",
    "b58encode",
    "format_address",
    "parse_address",
    "torch_dtype",
]

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Encode bytes in base58 (Bitcoin alphabet), keeping leading zero bytes as '1'."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Decode base58 text; raises ValueError on a character outside the alphabet."""
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


@dataclass(frozen=True, order=True)
class PeerId:
    """SHA-256 of a peer's Ed25519 public key (32 bytes)."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != 32:
            raise ValueError("a PeerId is exactly 32 bytes")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        """The id of a raw 32-byte Ed25519 public key."""
        return cls(hashlib.sha256(public_key).digest())

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse the base58 or 64-character hex form."""
        try:
            raw = bytes.fromhex(text) if len(text) == 64 else b58decode(text)
            return cls(raw)
        except ValueError as exc:
            raise ValueError(f"not a peer id: {text!r}") from exc

    def to_base58(self) -> str:
        return b58encode(self.digest)

    def hex(self) -> str:
        return self.digest.hex()

    def short(self) -> str:
        """The first characters of the base58 form, for log lines and tables."""
        return self.to_base58()[:10]

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.short()}…)"


@dataclass(frozen=True, order=True)
class LayerRange:
    """Layers ``start, start+1, ..., stop-1`` (half-open, like ``range``).

    ``LayerRange(0, 12)`` is what the CLI writes as ``--layers 0:12``: layers 0..11.
    """

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.stop, int)):
            raise TypeError("LayerRange bounds must be integers")
        if self.start < 0 or self.stop <= self.start:
            raise ValueError(f"invalid layer range [{self.start}, {self.stop})")

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        """Parse ``"A:B"`` (half-open); raises ValueError with the offending text."""
        try:
            a, b = text.split(":")
            return cls(int(a), int(b))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"layer range must look like START:STOP, got {text!r}") from exc

    def __len__(self) -> int:
        return self.stop - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.stop

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.start, self.stop))

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"


class ServerState(enum.StrEnum):
    """Where a server is in its life; announced in the DHT and answered to ``info``.

    ``joining`` (loading and measuring; routes avoid it), ``online`` (takes sessions),
    ``draining`` (a clean stop is under way: finishes its sessions, takes no new ones).
    """

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"


class Reachability(enum.StrEnum):
    """Whether others can dial a server at the address it announces (a majority of
    dial-back peers decides, `swarm.server.reachability`): ``unknown`` before a check or
    when no peer could vote, ``reachable``, ``unreachable``."""

    UNKNOWN = "unknown"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


class MoveReason(enum.StrEnum):
    """Why a server moved to another layer range; announced with the move.

    ``uncovered``: the move covers blocks that no server served; ``bottleneck``: it raises
    the swarm's bottleneck throughput (the least served block's) by the configured margin.
    """

    UNCOVERED = "uncovered"
    BOTTLENECK = "bottleneck"


def parse_address(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:port"`` for IPv6). Raises `ConfigError` if malformed."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ConfigError(f"not a host:port address: {text!r}")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """``host:port`` (``[host]:port`` for IPv6), the inverse of `parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


DtypeName = Literal["float32", "float16", "bfloat16"]
# How a server keeps its layers' projection weights (swarm.shards.quant.Quantization's values).
QuantName = Literal["none", "int8", "int4"]
FLOAT_DTYPES: tuple[DtypeName, ...] = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in `FLOAT_DTYPES` (or ``"int64"``, for token ids).

    Raises `ConfigError` naming the allowed names otherwise.
    """
    import torch

    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
    }
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(FLOAT_DTYPES)}") from None
