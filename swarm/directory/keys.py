"""The swarm's namespace in the DHT: every key format, in one place.

- ``"<model_id>/block/<i>"``: one record per server of block ``i`` (a `ServerAnnouncement`);
- ``"<model_id>/evidence"``: one record per reporter (a signed `Evidence`);
- ``"<model_id>/evidence/<digest>/<i>"``: chunk ``i`` of the material behind an evidence.
"""

from __future__ import annotations

__all__ = ["block_key", "block_keys", "evidence_key", "material_key"]


def block_key(model_id: str, block: int) -> str:
    """The key under which the servers of one block announce themselves."""
    return f"{model_id}/block/{block}"


def block_keys(model_id: str, num_layers: int) -> list[str]:
    """The block keys of a model, in block order."""
    return [block_key(model_id, i) for i in range(num_layers)]


def evidence_key(model_id: str) -> str:
    """The key under which reporters publish evidence against a model's servers."""
    return f"{model_id}/evidence"


def material_key(model_id: str, digest: str, index: int) -> str:
    """The key of chunk ``index`` of the material behind the evidence with ``digest``."""
    return f"{model_id}/evidence/{digest}/{index}"
