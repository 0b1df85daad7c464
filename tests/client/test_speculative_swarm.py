"""Speculative decoding through real chains: the tokens are plain decoding's, whatever is
guessed, however many at a time, through a killed server and a hedged hop; sampled tokens are
the same for a seed; a liar on guessed positions is caught while rejected guesses never count
against an honest server; over distance a round trip yields several tokens; concurrent
generations share their head passes, off the event loop.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
import trio

from swarm.client.config import ClientConfig, HedgeConfig, RecordsConfig, SpeculationConfig
from swarm.client.discovery import StaticDirectory
from swarm.client.model import AsyncRemoteModel, GenerationResult
from swarm.client.sampling import SamplingConfig
from swarm.errors import ConfigError
from swarm.lab.liar import LyingHandlers
from swarm.lab.reference import LocalModel
from swarm.net.methods import HandlerRegistry
from swarm.server.config import ServerConfig
from swarm.server.handlers import ServingHandlers
from swarm.shards import Head
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.links import LinkEmulator, LinkSpec
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

from .fake_server import run_servers
from .pipeline import make_servers

pytestmark = pytest.mark.slow  # in-process swarms on real time (hedges, emulated distance)

DEMO_TOKENIZER = Path(__file__).parents[2] / "swarm/assets/models/swarm-demo/tokenizer.json"
NEW = 24
REPEATS = [40, 41, 42, 43, 44, 45] * 4  # a prompt that prompt lookup guesses well
PROMPTS = {"repeats": REPEATS, "mixed": [7, 300, 12, 5000, 9, 41, 42, 43, 77], "one": [11]}
RANGES = [LayerRange(0, 2), LayerRange(2, 4), LayerRange(4, 6)]


def _checkpoint(folder: Path, seed: int, layers: int = 6) -> Path:
    path = write_random_llama(folder, num_layers=layers, vocab=6144, std=0.1, seed=seed)
    shutil.copy(DEMO_TOKENIZER, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("target") / "tiny", seed=0)


@pytest.fixture(scope="module")
def reference(target: Path) -> dict[str, list[int]]:
    local = LocalModel(target)
    return {name: _until_eos(local.generate(p, NEW).ids) for name, p in PROMPTS.items()}


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(2) + 1] if 2 in ids else ids


def _config(
    address: str, mode: str = "ngram", k: int | None = None, **more: object
) -> ClientConfig:
    spec = SpeculationConfig(mode=mode, fixed_k=k)
    return ClientConfig(initial_peers=(address,), speculation=spec, **more)  # type: ignore[arg-type]


async def test_greedy_guesses_give_the_plain_tokens(
    target: Path, reference: dict[str, list[int]], tmp_path: Path
) -> None:
    """Prompt lookup at k = 1..8 and draft models (the target's twin, whose guesses are all
    right, and another random model, whose guesses mostly fail), three prompts each."""
    twin = _checkpoint(tmp_path / "twin", seed=0)
    other = _checkpoint(tmp_path / "other", seed=9, layers=2)
    modes = [("ngram", k) for k in (1, 2, 3, 5, 8)] + [(str(twin), 4), (str(other), 3)]
    with trio.fail_after(600):
        async with open_local_swarm(target, RANGES) as local:
            for mode, k in modes:
                config = _config(local.dht_address, mode, k)
                async with AsyncRemoteModel.open(target, config) as model:
                    for name, prompt in PROMPTS.items():
                        result = await model.generate_detailed(prompt, NEW)
                        assert result.ids == reference[name], (mode, k, name)
                        if mode == str(twin):  # every guess right: k + 1 tokens a round
                            assert result.rounds <= 1 + -(-(len(result.ids) - 1) // (k + 1))
                        if mode == "ngram" and name == "repeats":
                            assert result.rounds < len(result.ids)


async def test_a_request_cannot_name_a_draft_model(target: Path) -> None:
    async with AsyncRemoteModel.open(
        target, ClientConfig(), directory=StaticDirectory([])
    ) as model:
        with pytest.raises(ConfigError, match="speculative mode"):
            model.stream([1, 2], 4, speculative="/etc/passwd")


async def test_sampled_guesses_give_the_plain_tokens_for_a_seed(target: Path) -> None:
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    with trio.fail_after(300):
        async with open_local_swarm(target, RANGES) as local:
            results = {}
            for mode, k in (("off", None), ("ngram", 4), ("ngram", 8)):
                async with AsyncRemoteModel.open(target, _config(local.dht_address, mode, k)) as m:
                    results[(mode, k)] = [
                        (await m.generate_detailed(p, NEW, sampling)).ids for p in PROMPTS.values()
                    ]
            other_seed = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=99)
            async with AsyncRemoteModel.open(target, _config(local.dht_address, "off")) as m:
                different = (await m.generate_detailed(REPEATS, NEW, other_seed)).ids
    plain = results[("off", None)]
    assert results[("ngram", 4)] == plain and results[("ngram", 8)] == plain
    assert different != plain[0]


async def test_guesses_survive_a_killed_server_and_a_hedged_hop(target: Path) -> None:
    """Fake servers [0,3) [3,6) plus replicas: the first [3,6) dies at step 3 (recovery
    replays only accepted history), then the first [0,3) stalls at step 6 (a hedge)."""
    want = _until_eos(LocalModel(target).generate(REPEATS, NEW).ids)
    servers = make_servers(target, [(0, 3), (3, 6), (3, 6), (0, 3)])
    servers[1].die_at_step = 3
    servers[0].hang_at_step = 6
    hedging = HedgeConfig(after=3.0, floor=0.3)
    config = ClientConfig(speculation=SpeculationConfig(mode="ngram", fixed_k=4), hedging=hedging)
    with trio.fail_after(120):
        async with run_servers(servers):
            # ports are known now; the replicas look slow, so routes start on servers 0 and 1
            speeds = [100.0, 100.0, 1.0, 1.0]
            directory = StaticDirectory([s.view(v) for s, v in zip(servers, speeds, strict=True)])
            async with AsyncRemoteModel.open(target, config, directory=directory) as model:
                result = await model.generate_detailed(REPEATS, NEW)
    assert result.ids == want
    assert result.recoveries >= 1
    assert result.rounds < len(result.ids)


def _drafts_liar(honest: ServingHandlers) -> HandlerRegistry:
    """Lies on the guessed positions of speculative steps (2-9 tokens, all but the first)."""

    def corrupt(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if 2 <= hidden.shape[1] <= 9:
            out = out.clone()
            out[:, 1:] += 0.05 * out[:, 1:].std()
        return out

    return LyingHandlers(honest, corrupt).registry()


@pytest.mark.parametrize("liar", [False, True])
async def test_spot_checks_catch_lies_on_guesses_and_spare_rejected_ones(
    target: Path, reference: dict[str, list[int]], tmp_path: Path, liar: bool
) -> None:
    """Every step checked (``spot-check:1.0``) while guesses often fail: an honest swarm is
    never flagged; a server that lies only on guessed positions is caught and the answer is
    the honest one."""
    # every server announces the same throughput (none measured), so each route is drawn at
    # random among the three (`RouteCosts.jitter`): measured under load, the liar (the last
    # to start) came out slower and a client never routed through it (2 runs in 7 beside
    # CPU burners, with every output correct and nobody named)
    base = ServerConfig(model=target, announce_ttl=30.0, measure_throughput=False)
    with trio.fail_after(300):
        async with open_local_swarm(target, [LayerRange(0, 6)], config=base) as local:
            await local.add_server(LayerRange(0, 6))
            if liar:
                await local.add_server(LayerRange(0, 6), wrap_handlers=_drafts_liar)
            config = _config(
                local.dht_address,
                "ngram",
                4,
                verify="spot-check:1.0",
                records=RecordsConfig(reputation_path=None, seed=0),
            )
            async with AsyncRemoteModel.open(target, config) as model:
                named = set()
                for name in ("repeats", "mixed"):
                    # each generation until the liar (if any) has been routed and caught
                    for _ in range(4):
                        result = await model.generate_detailed(PROMPTS[name], NEW)
                        assert result.ids == reference[name]
                        assert result.speculation is not None and result.speculation.drafted
                        assert model.verifier is not None
                        named |= {peer for peer, _ in model.verifier.detections}
                # with a liar: generate on until a route has drawn it (1/3 a generation)
                for _ in range(24 if liar else 0):
                    if named:
                        break
                    result = await model.generate_detailed(PROMPTS["repeats"], NEW)
                    assert result.ids == reference["repeats"]
                    assert model.verifier is not None
                    named |= {peer for peer, _ in model.verifier.detections}
    liars = {s.ready.peer_id for s in local.servers[2:]}
    assert named == liars


async def test_over_distance_a_round_trip_yields_several_tokens(target: Path) -> None:
    """25 ms one way on every link (client to each server, server to server): the repeating
    prompt takes fewer round trips than tokens, with the same tokens. Prompt lookup guesses
    every round (``ngram``): under ``auto`` the planner may measure a loaded machine's noise
    in its first rounds and stop guessing, which a full run once saw (24 rounds for 24)."""
    want = _until_eos(LocalModel(target).generate(REPEATS, NEW).ids)
    with trio.fail_after(300):
        async with (
            LinkEmulator(LinkSpec(delay=0.025)) as links,
            open_local_swarm(target, links=links) as local,
        ):
            for layers in RANGES:
                await local.add_server(layers)
            config = _config(local.dht_address, "ngram")
            transport = links.transport("client")
            async with AsyncRemoteModel.open(target, config, transport=transport) as model:
                result = await model.generate_detailed(REPEATS, NEW)
    assert result.ids == want
    assert result.rounds < len(result.ids)
    assert result.speculation is not None and result.speculation.accepted > 0


async def test_concurrent_generations_share_head_passes_off_the_loop(target: Path) -> None:
    """8 generations at once on one client: each equals its lone run; the head ran in fewer
    passes than it was asked for, and never on the event loop's thread."""
    prompts = [[100 + i, 7, 300 + i, 42] for i in range(8)]
    threads: set[int] = set()
    real = Head.logits

    def spy(self: Head, hidden: torch.Tensor) -> torch.Tensor:
        threads.add(threading.get_ident())
        return real(self, hidden)

    with trio.fail_after(300):
        async with open_local_swarm(target, [RANGES[0], LayerRange(2, 6)]) as local:
            config = _config(local.dht_address, "off")
            async with AsyncRemoteModel.open(target, config) as model:
                alone = [(await model.generate_detailed(p, 12)).ids for p in prompts]
                before = model.heads.statistics()
                Head.logits = spy  # type: ignore[method-assign]
                try:
                    got: dict[int, list[int]] = {}

                    async def one(i: int) -> None:
                        got[i] = (await model.generate_detailed(prompts[i], 12)).ids

                    async with trio.open_nursery() as nursery:
                        for i in range(8):
                            nursery.start_soon(one, i)
                finally:
                    Head.logits = real  # type: ignore[method-assign]
                after = model.heads.statistics()
    assert [got[i] for i in range(8)] == alone
    requests, calls = after.requests - before.requests, after.calls - before.calls
    assert requests == sum(len(ids) for ids in alone)
    assert calls < requests  # rows due together shared a pass
    assert threading.get_ident() not in threads


async def test_concurrent_speculative_generations_each_equal_their_lone_plain_run(
    target: Path,
) -> None:
    """Four speculative generations at once on one client (prompt lookup at k = 4, prompts
    that it guesses well and badly): each gives the tokens of its own plain run alone, and
    guesses were accepted (rounds fewer than tokens) while they shared the servers."""
    prompts = [REPEATS, [7, 300, 12, 5000, 9, 41, 42, 43, 77], [50, 51, 52] * 5, [11]]
    with trio.fail_after(300):
        async with open_local_swarm(target, RANGES) as local:
            async with AsyncRemoteModel.open(target, _config(local.dht_address, "off")) as plain:
                alone = [(await plain.generate_detailed(p, NEW)).ids for p in prompts]
            config = _config(local.dht_address, "ngram", 4)
            async with AsyncRemoteModel.open(target, config) as model:
                got: dict[int, GenerationResult] = {}

                async def one(i: int) -> None:
                    got[i] = await model.generate_detailed(prompts[i], NEW)

                async with trio.open_nursery() as nursery:
                    for i in range(len(prompts)):
                        nursery.start_soon(one, i)
    assert [got[i].ids for i in range(len(prompts))] == alone
    assert got[0].rounds < len(got[0].ids)
    assert sum(r.speculation.accepted for r in got.values() if r.speculation) > 0
