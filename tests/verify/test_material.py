"""Evidence material: chunked through the DHT by its reporter, decoded strictly."""

from __future__ import annotations

import msgpack
import pytest
import torch
import trio

from swarm.dht import DHTConfig, DHTNode
from swarm.directory import DHTEvidenceBoard
from swarm.errors import ProtocolError, VerificationError
from swarm.identity import Identity
from swarm.verify.material import decode_material, encode_material, fetch_material
from swarm.verify.receipts import EvidenceFile


def material() -> EvidenceFile:
    gen = torch.Generator().manual_seed(0)
    return EvidenceFile(
        torch.randn(1, 20, 64, generator=gen),
        torch.arange(20).view(1, 20),
        torch.randn(1, 1, 64, generator=gen),
        torch.randn(1, 1, 64, generator=gen),
    )


def test_round_trip_and_strict_decoding() -> None:
    back = decode_material(encode_material(material()))
    for name in ("inputs", "positions", "step_inputs", "step_outputs"):
        assert torch.equal(getattr(back, name), getattr(material(), name))
    with pytest.raises(ProtocolError):
        decode_material(msgpack.packb({"inputs": 1}))
    with pytest.raises(ProtocolError):
        decode_material(b"\xc1garbage")


async def test_only_the_reporters_chunks_count() -> None:
    reporter, forger = Identity.generate(), Identity.generate()
    with trio.fail_after(30):
        async with DHTNode.open(reporter, DHTConfig()) as a:
            config = DHTConfig(initial_peers=(a.address,))
            async with DHTNode.open(forger, config) as b:
                board = DHTEvidenceBoard(a, ttl=60)
                chunks = await board.publish_material("m", "d", encode_material(material()))
                assert chunks > 1
                got = await fetch_material(b, "m", "d", reporter.peer_id)
                assert torch.equal(got.inputs, material().inputs)
                with pytest.raises(VerificationError, match="not published"):
                    await fetch_material(a, "m", "d", forger.peer_id)
