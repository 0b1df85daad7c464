"""Speculative decoding's parts: the acceptance rules, the drafters, the planner of k.

The token loop's use of them (through a real chain) is tested in test_speculative_swarm.py;
here a toy target (a fixed random Markov chain over a small vocabulary) stands in for the
model, so that thousands of rounds run in a second.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from swarm.client.sampling import Sampler, SamplingConfig, distribution
from swarm.client.speculation import (
    DraftModel,
    ModelDrafter,
    NgramDrafter,
    SpeculationPlanner,
    accept,
    accept_residual,
    expected_tokens,
)
from swarm.errors import ConfigError
from swarm.testing.checkpoints import write_random_llama

VOCAB = 12
# chi-square critical values at a false-alarm rate of 1e-3 (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {4: 18.467, 11: 31.264}


def _toy_logits(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, VOCAB, generator=generator) * 2.0  # row: logits after a token


def _plain(table: torch.Tensor, prompt: list[int], n: int, sampler: Sampler) -> list[int]:
    context, out = list(prompt), []
    for i in range(n):
        token = int(sampler.sample(table[context[-1]].view(1, -1), i)[0])
        out.append(token)
        context.append(token)
    return out


def _speculative(
    table: torch.Tensor, prompt: list[int], n: int, sampler: Sampler, drafts: random.Random, k: int
) -> tuple[list[int], int]:
    """Rounds of k random guesses (a poor drafter), checked against the toy target."""
    context, out, rounds = list(prompt), [], 0
    while len(out) < n:
        draft = [drafts.randrange(VOCAB) if drafts.random() < 0.5 else -1 for _ in range(k)]
        # a good guess half the time: the target's own argmax
        last, guesses = context[-1], []
        for g in draft:
            guess = g if g >= 0 else int(table[last].argmax())
            guesses.append(guess)
            last = guess
        rows = [context[-1], *guesses]  # row i predicts the token after rows[i]
        verdict = accept(sampler, table[rows], guesses, len(out))
        out.extend(verdict.tokens)
        context.extend(verdict.tokens)
        rounds += 1
    return out[:n], rounds


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_speculative_tokens_are_plain_tokens(temperature: float, k: int) -> None:
    table = _toy_logits()
    config = SamplingConfig(temperature=temperature, top_k=8, top_p=0.95, seed=11)
    plain = _plain(table, [3], 200, Sampler(config))
    spec, rounds = _speculative(table, [3], 200, Sampler(config), random.Random(k), k)
    assert spec == plain
    assert rounds < 200  # some drafts were accepted


def test_a_seed_reproduces_across_round_lengths_and_differs_across_seeds() -> None:
    table = _toy_logits(1)
    config = SamplingConfig(temperature=1.0, seed=5)
    runs = {
        tuple(_speculative(table, [0], 100, Sampler(config), random.Random(s), k)[0])
        for s, k in [(0, 1), (1, 4), (2, 8)]
    }
    assert len(runs) == 1
    other = SamplingConfig(temperature=1.0, seed=6)
    assert _plain(table, [0], 100, Sampler(other)) != list(runs.pop())


def _chi2(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


def test_sampler_draws_from_the_target_distribution() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2))
    config = SamplingConfig(temperature=1.0, seed=3)
    sampler = Sampler(config)
    counts = [0] * VOCAB
    for i in range(6000):
        counts[int(sampler.sample(logits, i)[0])] += 1
    probs = distribution(logits, config)[0].tolist()
    assert _chi2(counts, probs) < CHI2_999[VOCAB - 1]


def test_residual_rule_keeps_the_target_distribution() -> None:
    """The textbook rule, first token of a round: its frequencies follow p (chi-square at a
    1e-3 false-alarm rate), for a fixed guess and for a model draft q."""
    p = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    q = torch.tensor([0.1, 0.5, 0.1, 0.2, 0.1])
    generator = torch.Generator().manual_seed(0)
    for draft_probs in (None, q.view(1, -1)):
        counts = [0] * 5
        accepted = 0
        for _ in range(5000):
            if draft_probs is None:
                guess = 1
            else:
                guess = int(torch.multinomial(q, 1, generator=generator))
            verdict = accept_residual(torch.stack([p, p]), [guess], draft_probs, generator)
            counts[verdict.tokens[0]] += 1
            accepted += verdict.accepted
        assert _chi2(counts, p.tolist()) < CHI2_999[4]
        expected = 0.25 if draft_probs is None else float(torch.minimum(p, q).sum())
        assert abs(accepted / 5000 - expected) < 0.04


def test_greedy_acceptance_counts() -> None:
    logits = torch.full((4, VOCAB), -5.0)
    for row, best in enumerate([7, 2, 9, 4]):
        logits[row, best] = 5.0
    sampler = Sampler(SamplingConfig())
    assert accept(sampler, logits, [7, 2, 9], 0).tokens == (7, 2, 9, 4)
    verdict = accept(sampler, logits, [7, 3, 9], 0)
    assert verdict.tokens == (7, 2) and verdict.accepted == 1 and verdict.drafted == 3
    assert accept(sampler, logits[:1], [], 0).tokens == (7,)


def test_ngram_drafter_proposes_what_followed_the_latest_match() -> None:
    drafter = NgramDrafter(max_ngram=3)
    sampler = Sampler(SamplingConfig())
    context = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6]
    # "5 6" occurred twice before; the latest is followed by 7 2 3
    assert drafter.propose(context, 3, sampler, 0).tokens == (7, 2, 3)
    assert drafter.propose([*context, 7], 4, sampler, 0).tokens == (2, 3, 5, 6)
    assert drafter.propose([1, 2, 3, 4], 4, sampler, 0).tokens == ()
    # a context that is not an extension (a rollback) is indexed anew
    assert drafter.propose([9, 8, 9], 2, sampler, 0).tokens == (8, 9)


def test_planner_drafts_long_over_distance_and_not_when_drafts_fail() -> None:
    far = SpeculationPlanner(max_k=8)
    for _ in range(20):
        far.record(drafted=4, accepted=4, step_seconds=0.100)
        far.record(drafted=2, accepted=2, step_seconds=0.098)
    assert far.choose_k() >= 6
    failing = SpeculationPlanner(max_k=8)
    for _ in range(20):
        failing.record(drafted=2, accepted=0, step_seconds=0.020)
        failing.record(drafted=1, accepted=0, step_seconds=0.019)
    assert failing.choose_k() == 0
    compute_bound = SpeculationPlanner(max_k=8)
    for k in range(1, 5):  # every extra position costs as much as the first
        compute_bound.record(drafted=k, accepted=k // 2, step_seconds=0.010 * (k + 1))
    assert compute_bound.choose_k() == 0
    assert SpeculationPlanner(fixed_k=3).choose_k() == 3
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0


def _word_tokenizer(folder: Path, words: int) -> Tokenizer:
    vocab = {f"w{i}": i for i in range(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def test_model_drafter_guesses_its_own_twin_and_refuses_another_tokenizer(
    tmp_path: Path,
) -> None:
    target = write_random_llama(tmp_path / "target", num_layers=2, vocab=64, std=0.5)
    tokenizer = _word_tokenizer(target, 64)
    twin = write_random_llama(tmp_path / "twin", num_layers=2, vocab=64, std=0.5)
    _word_tokenizer(twin, 64)
    drafter = ModelDrafter(DraftModel.load(twin, tokenizer))
    sampler = Sampler(SamplingConfig(temperature=0.7, seed=1))
    from swarm.shards import KVCache, ModelConfig, load_head, load_span
    from swarm.types import LayerRange

    config = ModelConfig.from_pretrained(target)
    head, span = load_head(target), load_span(target, LayerRange(0, 2))
    context, answer = [1, 2, 3, 4], []
    with torch.inference_mode():
        for _ in range(4):  # rounds against the same weights: every guess is accepted
            draft = drafter.propose(context, 4, sampler, len(answer)).tokens
            assert len(draft) == 4
            ids = torch.tensor([[*context, *draft]])
            cache = KVCache.allocate(config, LayerRange(0, 2), 1, ids.shape[1])
            hidden = span(head.embed(ids), torch.arange(ids.shape[1]).view(1, -1), cache)
            logits = head.logits(hidden)[0, len(context) - 1 :]  # (k+1, vocab)
            verdict = accept(sampler, logits, draft, len(answer))
            assert verdict.accepted == 4
            context += verdict.tokens
            answer += verdict.tokens
    other = tmp_path / "other"
    write_random_llama(other, num_layers=1, vocab=64)
    _word_tokenizer(other, 63)
    with pytest.raises(ConfigError, match="another tokenizer"):
        DraftModel.load(other, tokenizer)
