"""Real in-process swarms: every policy against a lying peer ends with the honest tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel, GenerationResult
from swarm.shards import Span, load_span, model_id
from swarm.testing.adversaries import adversary_wrapper
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange, PeerId
from swarm.verify.compare import thresholds_for
from swarm.verify.ledger import FileLedger
from swarm.verify.material import fetch_material
from swarm.verify.receipts import (
    confirm_evidence,
    decode_evidence,
    evidence_digest,
    verify_evidence_signature,
)

from .conftest import NEW_TOKENS, PROMPT

WHOLE = LayerRange(0, 4)


async def run_with_liar(
    model4: Path, tmp_path: Path, spec: str, policy: str, honest: int = 2, seed: int = 1
) -> tuple[GenerationResult, AsyncRemoteModel, PeerId]:
    """A liar (measured throughput: routes prefer it) and ``honest`` slow-announcing peers."""
    async with open_local_swarm(model4) as local:
        liar = await local.add_server(WHOLE, wrap_handlers=adversary_wrapper(spec))
        for _ in range(honest):
            await local.add_server(WHOLE, measure_throughput=False)
        FileLedger(tmp_path / "ledger.json").deposit(liar.server.identity.peer_id, 100.0)
        config = ClientConfig(
            initial_peers=(local.dht_address,),
            verify=policy,
            records=RecordsConfig(
                ledger_path=str(tmp_path / "ledger.json"),
                seed=seed,
                reputation_path=str(tmp_path / "reputation.json"),
            ),
        )
        async with AsyncRemoteModel.open(model4, config) as model:
            result = await model.generate_detailed(PROMPT, NEW_TOKENS)
            published = await local.dht.get(f"{model_id(model4)}/evidence")
            for reporter, record in published.items():  # what anyone reading the DHT sees
                assert record.value is not None
                evidence = decode_evidence(record.value["evidence"])
                assert verify_evidence_signature(evidence) == liar.server.identity.peer_id
                # ... and anyone can fetch the material and re-run it on honest weights
                material = await fetch_material(
                    local.dht, model_id(model4), evidence_digest(evidence), reporter
                )
                span = load_span(model4, evidence.receipt.layer_range)

                def rerun(
                    inputs: torch.Tensor, positions: torch.Tensor, span: Span = span
                ) -> torch.Tensor:
                    with torch.no_grad():
                        return span(inputs.float(), positions)  # type: ignore[no-any-return]

                proven = confirm_evidence(
                    evidence, material, rerun, thresholds_for("float32", "float32")
                )
                assert proven == liar.server.identity.peer_id
            assert len(published) == (1 if model.published_evidence else 0)
            return result, model, liar.server.identity.peer_id


@pytest.mark.parametrize("spec", ["noise:0.01", "skip", "zeros", "other-weights:7"])
async def test_spot_check_bans_the_liar_and_ends_with_honest_tokens(
    model4: Path, reference: list[int], tmp_path: Path, spec: str
) -> None:
    with trio.fail_after(120):
        result, model, liar = await run_with_liar(model4, tmp_path, spec, "spot-check:0.2")
    assert result.ids == reference
    assert result.rollbacks >= 1
    assert model.verifier is not None and model.verifier.reputation.is_banned(liar)
    assert all(hop["peer"] != str(liar) for hop in result.route)
    first = model.verifier.detections[0][1]
    assert first < 30
    assert [verify_evidence_signature(e) for e in model.published_evidence] == [liar]
    assert FileLedger(tmp_path / "ledger.json").stake_of(liar) == 0.0


async def test_redundant_three_with_one_liar_gives_honest_tokens(
    model4: Path, reference: list[int], tmp_path: Path
) -> None:
    with trio.fail_after(120):
        result, model, liar = await run_with_liar(model4, tmp_path, "noise:0.01", "redundant:3")
    assert result.ids == reference
    assert model.verifier is not None and model.verifier.reputation.is_banned(liar)
    assert model.verifier.detections[0][1] == 0  # every step is checked: caught at once


async def test_optimistic_rolls_back_and_redoes_on_honest_peers(
    model4: Path, reference: list[int], tmp_path: Path
) -> None:
    with trio.fail_after(120):
        result, model, liar = await run_with_liar(model4, tmp_path, "skip", "optimistic")
    assert result.ids == reference
    assert result.rollbacks == 1
    assert model.verifier is not None and model.verifier.reputation.is_banned(liar)
    assert all(hop["peer"] != str(liar) for hop in result.route)


async def test_honest_swarm_is_never_flagged_and_reputation_persists(
    model4: Path, reference: list[int], tmp_path: Path
) -> None:
    """float32 and bfloat16 peers, every hop of every step checked (redundant:3)."""
    with trio.fail_after(120):
        async with open_local_swarm(model4) as local:
            await local.add_server(WHOLE)
            await local.add_server(WHOLE, dtype="bfloat16")
            await local.add_server(WHOLE, dtype="bfloat16")
            config = ClientConfig(
                initial_peers=(local.dht_address,),
                verify="redundant:3",
                records=RecordsConfig(reputation_path=str(tmp_path / "rep.json")),
            )
            async with AsyncRemoteModel.open(model4, config) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                assert model.verifier is not None
                assert model.verifier.detections == []
                assert result.rollbacks == 0
    from swarm.verify.reputation import Reputation

    saved = Reputation.load(tmp_path / "rep.json")
    assert len(saved.records()) == 3
    assert all(r.failed == 0 and r.passed > 0 for r in saved.records().values())
