"""`Chat`: three turns over one kept session, each sending only its new tokens, each answer
equal to a fresh greedy generation over the whole history."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
from tokenizers import Tokenizer

from swarm.client.chain import Chain
from swarm.client.chat import Chat, Turn
from swarm.client.config import ClientConfig, RecordsConfig, SpeculationConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.reference import LocalModel
from swarm.server.compute import ComputeConfig
from swarm.server.config import ServerConfig
from swarm.shards import ChatTemplate, load_tokenizer
from swarm.testing.checkpoints import GGUF_CHAT_TEMPLATE, write_random_gguf
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

MESSAGES = ["the cat sat", "on the mat", "and then?"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "tiny-chat.gguf"
    return write_random_gguf(path, qtype="Q8_0", num_layers=4, seed=3)


@pytest.fixture(scope="module")
def local(model_path: Path) -> LocalModel:
    return LocalModel(model_path)


@pytest.fixture
def step_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many new tokens every session step sends to the servers."""
    sizes: list[int] = []
    real = Chain.step

    async def spy(
        self: Chain, hidden: torch.Tensor, positions: torch.Tensor, **kwargs: object
    ) -> object:
        sizes.append(hidden.shape[1])
        return await real(self, hidden, positions, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Chain, "step", spy)
    return sizes


PLAIN = SpeculationConfig(mode="off")  # these tests count steps: no guesses


async def _converse(
    path: Path,
    tmp: Path,
    template: ChatTemplate | None = None,
    speculation: SpeculationConfig = PLAIN,
) -> tuple[list[Turn], int]:
    with trio.fail_after(120):
        # one prompt, one pass: the measured prefill chunk (16 tokens on a busy machine)
        # would split it, and an int8 layer multiplies up to 16 rows in bfloat16 and more
        # rows densely in float32, so the answer would depend on the machine's load
        whole = ServerConfig(
            model=path, announce_ttl=30.0, compute=ComputeConfig(prefill_chunk=4096)
        )
        async with open_local_swarm(
            path, [LayerRange(0, 2), LayerRange(2, 4)], config=whole
        ) as swarm:
            config = ClientConfig(
                initial_peers=(swarm.dht_address,),
                records=RecordsConfig(
                    reputation_path=str(tmp / "reputation.json"), evidence_dir=str(tmp / "evidence")
                ),
                speculation=speculation,
            )
            async with (
                AsyncRemoteModel.open(path, config) as model,
                Chat.open(model, max_length=512, template=template) as chat,
            ):
                for message in MESSAGES:
                    await chat.say(message, NEW_TOKENS)
                stats = chat.statistics()
    return list(stats.turns), stats.reprefills


def _check_answers(local: LocalModel, turns: list[Turn]) -> None:
    """Each answer equals a fresh greedy generation over everything its session was sent."""
    history: list[int] = []
    for turn in turns:
        history = [*(() if turn.fresh else history), *turn.sent]
        fresh = local.generate(history, len(turn.answer)).ids
        assert list(turn.answer) == fresh
        history += list(turn.answer[:-1])  # the last id is sent with the next turn


async def test_turns_send_only_new_tokens(
    model_path: Path, local: LocalModel, step_sizes: list[int], tmp_path: Path
) -> None:
    turns, reprefills = await _converse(model_path, tmp_path)
    assert reprefills == 0 and [t.fresh for t in turns] == [True, False, False]
    # every turn: one step with its new prompt tokens, then one step per generated token
    expected: list[int] = []
    for turn in turns:
        expected += [len(turn.sent)] + [1] * (len(turn.answer) - 1)
    assert step_sizes == expected
    # a turn is a generation like any other: route, per-token timings, signed receipts
    for turn in turns:
        assert [(hop["start"], hop["stop"]) for hop in turn.route] == [(0, 2), (2, 4)]
        assert len(turn.timings) == len(turn.answer) and all(t > 0 for t in turn.timings)
        assert len(turn.receipts) == 2 * len(turn.answer)  # each step, each of two hops
        assert {r.step for r in turn.receipts} <= set(range(sum(len(t.answer) for t in turns)))
    # re-prefilling would send the whole rendered conversation; a kept session sends less
    template, tokenizer = ChatTemplate(GGUF_CHAT_TEMPLATE), local_tokenizer(local)
    conversation: list[dict[str, str]] = []
    for message, turn in zip(MESSAGES, turns, strict=True):
        conversation.append({"role": "user", "content": message})
        whole = tokenizer.encode(template.render(conversation), add_special_tokens=False).ids
        if turn is not turns[0]:
            assert len(turn.sent) < len(whole) - len(turns[0].sent)
        conversation.append({"role": "assistant", "content": turn.text})
    _check_answers(local, turns)


async def test_speculative_turns_are_the_plain_turns(
    model_path: Path, local: LocalModel, tmp_path: Path, step_sizes: list[int]
) -> None:
    """Guesses checked several per step, rejected ones dropped from the caches at the next
    step, also across turns: the same answers as plain decoding."""
    plain, _ = await _converse(model_path, tmp_path / "plain")
    plain_steps = len(step_sizes)
    guessed = SpeculationConfig(mode="ngram", fixed_k=4)
    turns, reprefills = await _converse(model_path, tmp_path / "spec", speculation=guessed)
    assert reprefills == 0
    guessing = step_sizes[plain_steps:]
    assert sum(1 for n in guessing if n > 1) > len(turns)  # guesses went out, not only prompts
    assert [t.answer for t in turns] == [t.answer for t in plain]
    _check_answers(local, turns)


def local_tokenizer(local: LocalModel) -> Tokenizer:
    tokenizer = load_tokenizer(local.path)
    assert tokenizer is not None
    return tokenizer


async def test_template_that_rewrites_history_reprefills(
    model_path: Path, local: LocalModel, step_sizes: list[int], tmp_path: Path
) -> None:
    # drops earlier assistant turns: what the session holds no longer prefixes the prompt
    forgetful = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'user' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"
    )
    turns, reprefills = await _converse(model_path, tmp_path, forgetful)
    assert reprefills == 2 and all(t.fresh for t in turns)
    for turn in turns[1:]:
        assert turn.sent[0] == 1  # <|im_start|>: the whole conversation, from its start
    _check_answers(local, turns)


async def test_a_proven_lie_redoes_the_turn_on_honest_peers(
    model_path: Path, local: LocalModel, tmp_path: Path
) -> None:
    from swarm.testing.adversaries import adversary_wrapper

    whole = LayerRange(0, 4)
    with trio.fail_after(180):
        async with open_local_swarm(model_path) as swarm:
            liar = await swarm.add_server(whole, wrap_handlers=adversary_wrapper("zeros"))
            for _ in range(2):
                await swarm.add_server(whole, measure_throughput=False)
            config = ClientConfig(
                initial_peers=(swarm.dht_address,),
                verify="spot-check:1.0",
                records=RecordsConfig(
                    reputation_path=str(tmp_path / "reputation.json"),
                    evidence_dir=str(tmp_path / "evidence"),
                ),
            )
            async with (
                AsyncRemoteModel.open(model_path, config) as model,
                Chat.open(model, max_length=512) as chat,
            ):
                for message in MESSAGES[:2]:
                    await chat.say(message, NEW_TOKENS)
                stats = chat.statistics()
                assert model.verifier is not None
                caught = {str(peer) for peer, _ in model.verifier.statistics().detections}
    assert str(liar.server.identity.peer_id) in caught
    assert stats.reprefills >= 1  # the lying turn was redone on a fresh session
    _check_answers(local, list(stats.turns))
