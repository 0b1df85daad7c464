"""Evidence material: the tensors behind a proven lie, as bytes and back.

The material of an `Evidence` (the hop's input history, positions, and the accused's step
input and output: an `EvidenceFile`) is encoded as one msgpack map of tensor-codec entries.
`swarm.directory.evidence` publishes those bytes in reporter-signed chunks; `fetch_material`
reads them back and decodes the tensors strictly, and `confirm_evidence` then checks them
against the signed hashes before re-running them.
"""

from __future__ import annotations

import msgpack
import torch

from swarm.dht import DHTNode
from swarm.directory import fetch_material_bytes
from swarm.errors import ProtocolError
from swarm.net.messages import unpack
from swarm.net.tensors import decode_tensor, encode_tensor
from swarm.types import PeerId
from swarm.verify.receipts import EvidenceFile

__all__ = ["decode_material", "encode_material", "fetch_material"]

_FIELDS = ("inputs", "positions", "step_inputs", "step_outputs")


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


async def fetch_material(
    dht: DHTNode, model_id: str, digest: str, reporter: PeerId
) -> EvidenceFile:
    """The material the ``reporter`` published for the evidence with this ``digest``.

    Only chunks signed by the reporter count. Raises `VerificationError` when chunks are
    missing or inconsistent, `ProtocolError` when they do not decode.
    """
    return decode_material(await fetch_material_bytes(dht, model_id, digest, reporter))
