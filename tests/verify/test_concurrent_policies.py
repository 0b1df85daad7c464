"""Concurrent generations on one client under one client-wide policy: each keeps its own
verification state (replicas, receipts, checks), so none sees another's history.

Regression: `VerifiedSessions._replicas` was per-generation state on the object every stream
shares; four generations at once under ``redundant:3`` raised ``torch.cat(): expected a
non-empty list`` in one and named an honest server a liar in another.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel, GenerationResult
from swarm.testing.adversaries import adversary_wrapper
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange, PeerId

from .conftest import local_greedy

WHOLE = LayerRange(0, 4)
PROMPTS = [[5, 17, 30, 99, 42, 7, 64, 3], [9, 8, 7], [100, 2, 30, 40, 50], [33, 1]]
NEW = 8


@pytest.fixture(scope="module")
def references(model4: Path) -> list[list[int]]:
    return [local_greedy(model4, prompt, NEW) for prompt in PROMPTS]


async def _four_at_once(
    model4: Path, tmp_path: Path, policy: str, liar: str | None
) -> tuple[list[GenerationResult], set[PeerId], PeerId | None]:
    """Four generations at once through one client; their results, the peers the client's
    verifier named, and the liar's id."""
    async with open_local_swarm(model4) as local:
        liar_id = None
        if liar is not None:
            bad = await local.add_server(WHOLE, wrap_handlers=adversary_wrapper(liar))
            liar_id = bad.server.identity.peer_id
        for _ in range(3 if liar is None else 2):
            await local.add_server(WHOLE, measure_throughput=False)
        config = ClientConfig(
            initial_peers=(local.dht_address,),
            verify=policy,
            records=RecordsConfig(seed=3, reputation_path=str(tmp_path / "reputation.json")),
        )
        results: dict[int, GenerationResult] = {}
        async with AsyncRemoteModel.open(model4, config) as model:

            async def one(i: int) -> None:
                results[i] = await model.generate_detailed(PROMPTS[i], NEW)

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            assert model.verifier is not None
            named = {peer for peer, _ in model.verifier.detections}
            # each result counts its own generation's checks; the client's verifier, all
            own = [r.verification for r in results.values()]
            assert all(v is not None for v in own)
            assert sum(v.audits for v in own if v) == model.verifier.audits
            assert sum(len(v.detections) for v in own if v) == len(model.verifier.detections)
        return [results[i] for i in range(len(PROMPTS))], named, liar_id


@pytest.mark.parametrize("policy", ["redundant:3", "spot-check:0.5", "optimistic"])
async def test_concurrent_generations_with_honest_replicas(
    model4: Path, references: list[list[int]], tmp_path: Path, policy: str
) -> None:
    with trio.fail_after(180):
        results, named, _ = await _four_at_once(model4, tmp_path, policy, None)
    assert named == set(), f"an honest peer was named a liar under {policy}"
    for i, result in enumerate(results):
        assert result.ids == references[i], f"generation {i} differs from its lone run"
        assert result.rollbacks == 0


@pytest.mark.parametrize("policy", ["redundant:3", "spot-check:0.5", "optimistic"])
async def test_concurrent_generations_with_one_liar(
    model4: Path, references: list[list[int]], tmp_path: Path, policy: str
) -> None:
    with trio.fail_after(180):
        results, named, liar = await _four_at_once(model4, tmp_path, policy, "noise:0.01")
    assert named <= {liar}, f"an honest peer was named a liar under {policy}"
    for i, result in enumerate(results):
        assert result.ids == references[i], f"generation {i} differs from the honest reference"
