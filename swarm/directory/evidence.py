"""Evidence in the DHT, so that any peer can check a proven lie and re-run it.

An `Evidence` record (≤ 1 KB, under `evidence_key`, one per reporter) carries signatures and
hashes; the material behind it (the hop's input history and the accused's step input and
output, encoded by `swarm.verify.material`) is too large for one record, so the reporter
publishes it as numbered chunks under `material_key`, each a record signed by the reporter.
A reader fetches the chunks *of that reporter* and reassembles the bytes. Material over
`MAX_MATERIAL_BYTES` is not published (a 7B model's long history would be thousands of
chunks); the reporter keeps it in its local file.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from swarm.dht import DHTNode
from swarm.directory.keys import evidence_key, material_key
from swarm.errors import ProtocolError, SwarmError, VerificationError
from swarm.net.messages import Evidence, decode_message, encode_message
from swarm.types import PeerId

__all__ = [
    "CHUNK_BYTES",
    "MAX_MATERIAL_BYTES",
    "DHTEvidenceBoard",
    "fetch_evidence",
    "fetch_material_bytes",
]

log = logging.getLogger(__name__)

CHUNK_BYTES = 768  # leaves room for the record's key, ids, expiry and signature
MAX_MATERIAL_BYTES = 256 * 1024
MAX_CHUNKS = math.ceil(MAX_MATERIAL_BYTES / CHUNK_BYTES)


class DHTEvidenceBoard:
    """Publishes evidence and its material in the DHT (a `swarm.verify.EvidenceSink`).

    Publishing is best effort and bounded by ``timeout``: a DHT that cannot take it is
    logged, never raised, since the evidence is also kept locally by the reporter. Records
    live ``ttl`` seconds (at most what storing nodes accept, ``DHTConfig.storage.max_ttl``).
    """

    def __init__(self, dht: DHTNode, *, ttl: float | None = None, timeout: float = 10.0) -> None:
        self.dht = dht
        longest = dht.config.storage.max_ttl
        self.ttl = longest if ttl is None else min(ttl, longest)
        self.timeout = timeout

    async def publish(
        self, model_id: str, digest: str, evidence: Evidence, material: bytes
    ) -> None:
        with trio.move_on_after(self.timeout):
            try:
                await self.dht.announce(
                    evidence_key(model_id), {"evidence": encode_message(evidence)}, self.ttl
                )
                await self.publish_material(model_id, digest, material)
            except SwarmError as exc:
                log.info("could not publish evidence %s: %s", digest[:12], exc)

    async def publish_material(self, model_id: str, digest: str, data: bytes) -> int:
        """Announce material bytes in chunks; how many (0: too large to publish)."""
        if len(data) > MAX_MATERIAL_BYTES:
            return 0
        total = math.ceil(len(data) / CHUNK_BYTES)

        async def one(i: int) -> None:
            chunk = data[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]
            value = {"n": total, "data": chunk}
            await self.dht.announce(material_key(model_id, digest, i), value, self.ttl)

        async with trio.open_nursery() as nursery:
            for i in range(total):
                nursery.start_soon(one, i)
        return total


async def fetch_evidence(dht: DHTNode, model_id: str) -> dict[PeerId, Evidence]:
    """Every reporter's published evidence against the model's servers (bad ones dropped)."""
    out: dict[PeerId, Evidence] = {}
    for reporter, record in (await dht.get(evidence_key(model_id))).items():
        raw = record.value.get("evidence") if record.value is not None else None
        if not isinstance(raw, bytes):
            continue
        try:
            out[reporter] = decode_message(raw, expect=Evidence)
        except ProtocolError as exc:
            log.info("dropping evidence of %s: %s", reporter, exc)
    return out


async def fetch_material_bytes(dht: DHTNode, model_id: str, digest: str, reporter: PeerId) -> bytes:
    """The material bytes the ``reporter`` published for the evidence with ``digest``.

    Only chunks signed by the reporter count. Raises `VerificationError` when chunks are
    missing or inconsistent.
    """
    first = await _chunk(dht, model_id, digest, reporter, 0)
    total = first["n"]
    if not isinstance(total, int) or not 1 <= total <= MAX_CHUNKS:
        raise VerificationError(f"evidence material: bad chunk count {total!r}")
    keys = [material_key(model_id, digest, i) for i in range(1, total)]
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
    return b"".join(parts)


async def _chunk(
    dht: DHTNode, model_id: str, digest: str, reporter: PeerId, index: int
) -> dict[str, Any]:
    record = (await dht.get(material_key(model_id, digest, index))).get(reporter)
    value = record.value if record is not None else None
    if not isinstance(value, dict) or not isinstance(value.get("data"), bytes):
        raise VerificationError(f"evidence material chunk {index} of {digest} is not published")
    return dict(value)
