"""Mixed numerics under `spot-check:1.0`: an int4 and a float32 peer on one range never name
each other over a long generation, and a lying int4 peer is still caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel
from swarm.shards import Quantization
from swarm.testing.adversaries import adversary_wrapper
from swarm.testing.checkpoints import write_random_gguf
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

from .conftest import PROMPT

WHOLE = LayerRange(0, 4)
LONG = 64


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_gguf(tmp_path_factory.mktemp("mixed") / "q4_1.gguf", qtype="Q4_1", seed=11)


def _client(local_address: str, tmp_path: Path, **extra: object) -> ClientConfig:
    return ClientConfig(
        initial_peers=(local_address,),
        verify="spot-check:1.0",
        **extra,
        records=RecordsConfig(seed=3, reputation_path=str(tmp_path / "reputation.json")),
    )


@pytest.mark.parametrize("source", ["gguf-q4_1", "float32-requantized"])
async def test_int4_and_float32_peers_never_name_each_other(
    source: str, q4_model: Path, model4: Path, tmp_path: Path
) -> None:
    """From a Q4_1 file the int4 peer holds the file's own weights (float32 thresholds);
    from a float32 checkpoint it requantizes (the calibrated float32/int4 pair thresholds)."""
    path = q4_model if source == "gguf-q4_1" else model4
    with trio.fail_after(240):
        async with open_local_swarm(path) as local:
            int4 = await local.add_server(WHOLE, quant=Quantization.INT4)
            full = await local.add_server(WHOLE, quant=Quantization.NONE)
            async with AsyncRemoteModel.open(path, _client(local.dht_address, tmp_path)) as model:
                result = await model.generate_detailed(PROMPT[:4], LONG)
                assert model.verifier is not None
                assert model.verifier.detections == []
                for peer in (int4, full):
                    assert not model.verifier.reputation.is_banned(peer.server.identity.peer_id)
    assert len(result.ids) == LONG or result.ids[-1] in (2, 127)
    # (no token comparison: which peer serves each step decides bfloat16 or float32 rounding)


async def test_a_lying_int4_peer_is_caught(q4_model: Path, tmp_path: Path) -> None:
    """Checked by the other int4 peer first (same numerics: bfloat16-level thresholds, so a lie
    of 20 % of the output's size; float32 peers see ~1 %, and int4 against float32 only gross
    lies, see `swarm.verify.compare`)."""
    with trio.fail_after(240):
        async with open_local_swarm(q4_model) as local:
            liar = await local.add_server(
                WHOLE, quant=Quantization.INT4, wrap_handlers=adversary_wrapper("noise:0.2")
            )
            await local.add_server(WHOLE, quant=Quantization.INT4, measure_throughput=False)
            await local.add_server(WHOLE, quant=Quantization.NONE, measure_throughput=False)
            config = _client(local.dht_address, tmp_path)
            async with AsyncRemoteModel.open(q4_model, config) as model:
                result = await model.generate_detailed(PROMPT[:4], 24)
                assert model.verifier is not None
                liar_id = liar.server.identity.peer_id
                assert model.verifier.reputation.is_banned(liar_id), model.verifier
                assert {peer for peer, _ in model.verifier.detections} == {liar_id}
    assert all(hop["peer"] != str(liar_id) for hop in result.route)


async def test_a_client_requiring_int4_routes_only_through_int4(
    q4_model: Path, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with open_local_swarm(q4_model) as local:
            int4 = await local.add_server(WHOLE, quant=Quantization.INT4, measure_throughput=False)
            await local.add_server(WHOLE, quant=Quantization.NONE)  # faster: preferred otherwise
            config = ClientConfig(
                initial_peers=(local.dht_address,),
                quant="int4",
                records=RecordsConfig(reputation_path=None),
            )
            async with AsyncRemoteModel.open(q4_model, config) as model:
                result = await model.generate_detailed(PROMPT[:4], 6)
    assert {hop["peer"] for hop in result.route} == {str(int4.server.identity.peer_id)}


def test_canaries_judge_a_quantized_server_by_its_numerics(q4_model: Path) -> None:
    """The gateway's and `swarm status`'s canaries are computed in float32; an honest int4
    server's answer fails float32's own thresholds (bfloat16 inside the kernels) and passes
    those of its announced numerics."""
    import torch

    from swarm.directory.servers import ServerView
    from swarm.shards import load_span
    from swarm.types import PeerId
    from swarm.verify.compare import compare, thresholds_for

    x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8)[None]
    with torch.inference_mode():
        canary = load_span(q4_model, WHOLE)(x, positions)
        answer = load_span(q4_model, WHOLE, quant=Quantization.INT4)(x, positions)
    view = ServerView(PeerId(b"\1" * 32), "127.0.0.1:1", WHOLE, 1.0, 100, quantization="int4")
    assert view.numerics == "float32+int4"
    assert not compare(canary, answer, thresholds_for("float32", "float32")).ok
    assert compare(canary, answer, thresholds_for("float32", view.numerics)).ok
