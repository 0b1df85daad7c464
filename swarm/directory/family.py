"""Which model ids the servers of a model family serve: the hint for a client whose local
copy of the weights differs from the servers' (ids hash the weights, so such a client finds
no server at all and would otherwise not know why)."""

from __future__ import annotations

import logging

from swarm.dht import DHTNode
from swarm.directory.keys import family_key, model_family
from swarm.errors import SwarmError

__all__ = ["announce_model_id", "mismatch_hint", "other_model_ids"]

log = logging.getLogger(__name__)

_MAX_IDS = 8


async def announce_model_id(dht: DHTNode, model_id: str, ttl: float) -> None:
    """Say, under the family key, that this server serves ``model_id``."""
    await dht.announce(family_key(model_id), {"model_id": model_id}, ttl)


async def other_model_ids(dht: DHTNode, model_id: str) -> list[str]:
    """Ids of the same family announced by live servers, other than ``model_id`` (sorted,
    at most a few; bad records are skipped; a failed lookup gives none)."""
    try:
        records = await dht.get(family_key(model_id))
    except SwarmError as exc:
        log.info("looking up the ids of %s failed: %s", model_family(model_id), exc)
        return []
    prefix = model_family(model_id) + "-"
    found = set()
    for record in records.values():
        value = record.value.get("model_id") if record.value is not None else None
        if isinstance(value, str) and value.startswith(prefix) and len(value) <= 128:
            found.add(value)
    found.discard(model_id)
    return sorted(found)[:_MAX_IDS]


def mismatch_hint(model_id: str, others: list[str]) -> str:
    """The sentence that tells a client its copy is not the servers' (empty: no others)."""
    if not others:
        return ""
    return (
        f"no server serves {model_id}, the id of your local copy, but servers of "
        f"{model_family(model_id)} serve {', '.join(others)}: model ids hash the weights, so "
        "your checkpoint differs from theirs; use a byte-identical copy of theirs"
    )
