"""The swarm's namespace in the DHT: every key format, in one place.

- ``"<model_id>/block/<i>"``: one record per server of block ``i`` (a `ServerAnnouncement`);
- ``"<model_id>/evidence"``: one record per reporter (a signed `Evidence`);
- ``"<model_id>/evidence/<digest>/<i>"``: chunk ``i`` of the material behind an evidence;
- ``"<family>/models"``: one record per server naming the model id it serves, where the
  family is the readable part of the id (architecture and size, e.g. ``llama-135m``), so a
  client whose copy of the weights differs from the servers' can be told so;
- ``"swarm/relays"``: one record per peer that relays and dials back (a `RelayAnnouncement`):
  reachable servers and ``swarm dht`` nodes.
"""

from __future__ import annotations

__all__ = [
    "block_key",
    "block_keys",
    "evidence_key",
    "family_key",
    "material_key",
    "model_family",
    "parse_block_key",
    "relay_key",
]


def block_key(model_id: str, block: int) -> str:
    """The key under which the servers of one block announce themselves."""
    return f"{model_id}/block/{block}"


def parse_block_key(key: str) -> tuple[str, int] | None:
    """``(model_id, block)`` of a block key, or None for any other key."""
    model_id, sep, block = key.rpartition("/block/")
    if not sep or not model_id or not block.isdigit() or block != str(int(block)):
        return None
    return model_id, int(block)


def block_keys(model_id: str, num_layers: int) -> list[str]:
    """The block keys of a model, in block order."""
    return [block_key(model_id, i) for i in range(num_layers)]


def evidence_key(model_id: str) -> str:
    """The key under which reporters publish evidence against a model's servers."""
    return f"{model_id}/evidence"


def material_key(model_id: str, digest: str, index: int) -> str:
    """The key of chunk ``index`` of the material behind the evidence with ``digest``."""
    return f"{model_id}/evidence/{digest}/{index}"


def model_family(model_id: str) -> str:
    """The readable part of a model id (``llama-135m`` of ``llama-135m-0123456789ab``)."""
    family, sep, _digest = model_id.rpartition("-")
    return family if sep else model_id


def family_key(model_id: str) -> str:
    """The key under which servers of models of this family name the ids they serve."""
    return f"{model_family(model_id)}/models"


def relay_key() -> str:
    """The key under which relays (and dial-back helpers) announce themselves."""
    return "swarm/relays"
