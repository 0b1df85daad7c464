"""`AnnouncementProver`: a record is proven only when the server it names answers as the
record's signer at the announced address."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from swarm.dht.records import make_record
from swarm.directory import AnnouncementProver, block_key, evidence_key
from swarm.identity import Identity
from swarm.net.messages import ServerAnnouncement
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange, ServerState


def _announcement(host: str, port: int) -> dict[str, object]:
    return ServerAnnouncement(
        host=host,
        port=port,
        layer_range=LayerRange(0, 2),
        state=ServerState.ONLINE,
        dtype="float32",
        throughput=10.0,
        free_cache_tokens=100,
        active_sessions=0,
        version="test",
    ).to_wire()


async def test_only_the_named_server_proves_its_records(tmp_path: Path) -> None:
    model = write_random_llama(tmp_path / "m", num_layers=2, vocab=64)
    with trio.fail_after(60):
        async with open_local_swarm(model, [LayerRange(0, 2)]) as local:
            server = local.servers[0]
            real = server.server.identity
            forger = Identity.generate()
            prover = AnnouncementProver(Identity.generate())
            key = block_key("m-0123", 0)
            expires = time.time() + 60
            value = _announcement(server.ready.host, server.ready.port)
            honest = make_record(real, key, value, expires, 1, 1200)
            forged = make_record(forger, key, value, expires, 1, 1200)  # someone else's address
            elsewhere = make_record(real, key, _announcement("127.0.0.1", 9), expires, 1, 1200)
            other_key = make_record(real, evidence_key("m-0123"), {"x": 1}, expires, 1, 1200)
            claims = [prover.claim(r) for r in (honest, forged, elsewhere)]
            assert all(c is not None for c in claims)
            assert prover.claim(other_key) is None
            verdicts = [await prover.prove(c) for c in claims if c is not None]
    assert verdicts == [True, False, False]
