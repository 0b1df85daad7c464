"""Evidence material in the DHT, so that any peer can re-run a proven lie.

An `Evidence` record (≤ 1 KB, under ``"<model_id>/evidence"``) carries signatures and hashes;
the tensors behind it (the hop's input history, positions, and the accused's step input and
output: an `EvidenceFile`) are too large for one DHT record. The reporter publishes them as
numbered chunks under ``"<model_id>/evidence/<digest>/<i>"``, each chunk a record signed by the
reporter; a reader fetches the chunks *of that reporter*, reassembles them, decodes the
tensors strictly, and `confirm_evidence` then checks them against the signed hashes before
re-running them. Material over `MAX_MATERIAL_BYTES` is kept only in the reporter's local file
(a 7B model's long history would be thousands of chunks).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import torch
import trio

from swarm.dht import DHTNode
from swarm.errors import ProtocolError, VerificationError
from swarm.net.messages import unpack
from swarm.net.tensors import decode_tensor, encode_tensor
from swarm.types import PeerId
from swarm.verify.receipts import EvidenceFile

__all__ = ["CHUNK_BYTES", "MAX_MATERIAL_BYTES", "fetch_material", "publish_material"]

CHUNK_BYTES = 768  # leaves room for the record's key, ids, expiry and signature
MAX_MATERIAL_BYTES = 256 * 1024
_FIELDS = ("inputs", "positions", "step_inputs", "step_outputs")


def _chunk_key(model_id: str, digest: str, index: int) -> str:
    return f"{model_id}/evidence/{digest}/{index}"


def encode_material(material: EvidenceFile) -> bytes:
    """The four tensors as one msgpack map of tensor codec entries."""
    data: bytes = msgpack.packb(
        {name: encode_tensor(getattr(material, name).contiguous()) for name in _FIELDS},
        use_bin_type=True,
    )
    return data


def decode_material(data: bytes) -> EvidenceFile:
    """Strict inverse of `encode_material`; raises `ProtocolError` naming the bad field."""
    obj = unpack(data)
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        raise ProtocolError(f"evidence material: expected the fields {', '.join(_FIELDS)}")
    tensors: dict[str, torch.Tensor] = {
        name: decode_tensor(obj[name], f"material.{name}") for name in _FIELDS
    }
    return EvidenceFile(**tensors)


async def publish_material(
    dht: DHTNode, model_id: str, digest: str, material: EvidenceFile, ttl: float
) -> int:
    """Announce the material in chunks; returns how many (0 when it is too large to publish).

    Raises what `DHTNode.announce` raises.
    """
    data = encode_material(material)
    if len(data) > MAX_MATERIAL_BYTES:
        return 0
    total = math.ceil(len(data) / CHUNK_BYTES)

    async def one(i: int) -> None:
        chunk = data[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]
        await dht.announce(_chunk_key(model_id, digest, i), {"n": total, "data": chunk}, ttl)

    async with trio.open_nursery() as nursery:
        for i in range(total):
            nursery.start_soon(one, i)
    return total


async def fetch_material(
    dht: DHTNode, model_id: str, digest: str, reporter: PeerId
) -> EvidenceFile:
    """The material the `reporter` published for the evidence with this `digest`.

    Only chunks signed by the reporter count. Raises `VerificationError` when chunks are
    missing or inconsistent, `ProtocolError` when they do not decode.
    """
    first = await _chunk(dht, model_id, digest, reporter, 0)
    total = first["n"]
    if not isinstance(total, int) or not 1 <= total <= math.ceil(MAX_MATERIAL_BYTES / CHUNK_BYTES):
        raise VerificationError(f"evidence material: bad chunk count {total!r}")
    keys = [_chunk_key(model_id, digest, i) for i in range(1, total)]
    found = await dht.get_many(keys)
    parts = [first["data"]]
    for key in keys:
        record = found.get(key, {}).get(reporter)
        value: Any = record.value if record is not None else None
        if not isinstance(value, dict) or value.get("n") != total:
            raise VerificationError(f"evidence material: chunk {key} is missing or inconsistent")
        parts.append(value.get("data"))
    if not all(isinstance(part, bytes) for part in parts):
        raise VerificationError("evidence material: a chunk holds no bytes")
    return decode_material(b"".join(parts))


async def _chunk(
    dht: DHTNode, model_id: str, digest: str, reporter: PeerId, index: int
) -> dict[str, Any]:
    record = (await dht.get(_chunk_key(model_id, digest, index))).get(reporter)
    value = record.value if record is not None else None
    if not isinstance(value, dict) or not isinstance(value.get("data"), bytes):
        raise VerificationError(f"evidence material chunk {index} of {digest} is not published")
    return value
