"""The greedy screen: the float32 head's argmax, exactly, through an int8 pass and float32
for the candidates, on random heads, adversarial near-ties and the real head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swarm.errors import ShardError
from swarm.shards import load_head
from swarm.shards.bundled import default_model_path
from swarm.shards.screen import GreedyScreen
from swarm.testing.checkpoints import write_random_llama


def _check(screen: GreedyScreen, x: torch.Tensor) -> int:
    """Screened logits of ``x`` (rows, hidden) against the float matmul of each row alone:
    the same argmax, candidates bit for bit, the rest -inf; returns the candidates."""
    got = screen.logits(x)  # (rows, vocab)
    candidates = 0
    for r in range(x.shape[0]):
        full = F.linear(x[r : r + 1], screen.weight)[0]  # (vocab,)
        assert int(got[r].argmax()) == int(full.argmax())
        kept = torch.isfinite(got[r])
        assert torch.equal(got[r][kept], full[kept])
        assert bool((full[~kept] < full.max()).all())
        candidates += int(kept.sum())
    return candidates


@pytest.fixture(params=[True, False], ids=["fbgemm", "int8pack"])
def fbgemm(request: pytest.FixtureRequest) -> bool:
    """Both int8 passes: FBGEMM's exact int8 x int8 sums and PyTorch's weight-only kernel."""
    return bool(request.param)


def test_random_heads_pick_the_float_token(fbgemm: bool) -> None:
    g = torch.Generator().manual_seed(0)
    for vocab, hidden in [(3000, 64), (5000, 576), (257, 96)]:
        weight = torch.randn(vocab, hidden, generator=g) * 0.05
        weight[:, 3] *= 40  # an outlier column, as real heads have
        screen = GreedyScreen.build(weight, fbgemm=fbgemm)
        if not fbgemm:
            assert screen.kernel == "int8pack"
        for scale in (0.1, 1.0, 30.0):
            x = torch.randn(4, hidden, generator=g) * scale
            x[:, 7] *= 20  # and an outlier in the hidden state
            assert _check(screen, x) < 4 * vocab


def test_near_ties_the_int8_copy_cannot_see(fbgemm: bool) -> None:
    """Rows that round to the same int8 row but differ by an ulp or so in float32, exact
    duplicates (the first index wins), and rows built so that int8 ranks them the other way
    round: the float head's token every time."""
    g = torch.Generator().manual_seed(1)
    vocab, hidden = 2048, 128
    weight = torch.randn(vocab, hidden, generator=g) * 0.05
    x = torch.randn(1, hidden, generator=g)
    best = int(F.linear(x, weight).argmax())
    w = weight[best]
    # the next rows: the best row nudged by one ulp up and down in its largest-effect weight
    k = int((w * x[0]).abs().argmax())
    for j, direction in enumerate([float("inf"), float("-inf")] * 4):
        row = w.clone()
        for _ in range(j // 2 + 1):
            row[k] = torch.nextafter(row[k], torch.tensor(direction))
        weight[(best + 1 + j) % vocab] = row
    weight[(best + 40) % vocab] = w  # an exact duplicate after it: the first one wins
    weight[(best - 40) % vocab] = w  # and one before it: that one wins
    screen = GreedyScreen.build(weight, fbgemm=fbgemm)
    assert _check(screen, x) >= 10
    # int8 ranking the other way round: a row within a fraction of its quantization step
    margins = torch.linspace(-1e-3, 1e-3, 7)
    for m in margins:
        weight2 = weight.clone()
        rival = (best + 500) % vocab
        weight2[rival] = w + m * x[0] / x[0].norm() ** 2  # logit of best + m, exactly-ish
        _check(GreedyScreen.build(weight2, fbgemm=fbgemm), x)


def test_rows_that_are_not_finite_fall_back_to_float(fbgemm: bool) -> None:
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    screen = GreedyScreen.build(weight, fbgemm=fbgemm)
    x = torch.randn(2, 64)
    x[1, 5] = float("inf")
    got = screen.logits(x)
    torch.testing.assert_close(got[1], F.linear(x[1:2], weight)[0], rtol=0, atol=0, equal_nan=True)
    assert int(got[0].argmax()) == int(F.linear(x[:1], weight).argmax())


def test_a_blas_that_sums_blocks_differently_gets_no_screen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_random_llama(tmp_path / "m", num_layers=1, hidden=64, vocab=3000)
    real = GreedyScreen._exact_rows

    def off_by_an_ulp(self: GreedyScreen, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = real(self, x, rows)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(GreedyScreen, "_exact_rows", off_by_an_ulp)
    head = load_head(path, screen=True)
    assert head.screen is None  # greedy_logits is then the float head
    x = torch.randn(1, 2, 64)
    assert torch.equal(head.greedy_logits(x), head.logits(x))


def test_head_greedy_logits(tmp_path: Path) -> None:
    path = write_random_llama(tmp_path / "m", num_layers=1, hidden=64, vocab=3000)
    head = load_head(path, screen=True)
    assert head.screen is not None
    x = torch.randn(2, 3, 64) * 5
    greedy = head.greedy_logits(x)  # (2, 3, vocab)
    for b in range(2):
        for s in range(3):
            alone = head.logits(x[b : b + 1, s : s + 1])[0, 0]
            assert int(greedy[b, s].argmax()) == int(alone.argmax())
    with pytest.raises(ShardError):
        head.greedy_logits(torch.randn(1, 63))
    assert load_head(path).screen is None  # opt-in
    assert load_head(path, dtype=torch.bfloat16, screen=True).screen is None  # float32 only


def test_the_real_head_over_many_hidden_states() -> None:
    """SmolLM2's head (49,152 x 576, tied), hidden states of a real answer's size and shape
    (an outlier dimension), and their near-ties: the float head's token."""
    try:
        path = default_model_path()
    except ShardError as exc:
        pytest.skip(f"the default model is not installed ({exc})")
    head = load_head(path, screen=True)
    assert head.screen is not None
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(48, 1, 576, generator=g)
    hidden[..., 5] *= 30
    with torch.inference_mode():
        normed = head.norm(hidden)[:, 0]  # (48, 576)
        total = _check(head.screen, normed)
        # a state halfway between two tokens' rows: their logits nearly tied
        w = head.lm_head.weight
        for a, b in [(100, 101), (2000, 30000), (17, 48000)]:
            x = (w[a] + w[b])[None] * 8
            _check(head.screen, x)
    assert total < 48 * 2000  # the screen screens


def test_states_far_from_unit_scale(fbgemm: bool) -> None:
    """Tiny and huge hidden states (FBGEMM's grid step would leave float32's comfortable
    range: those rows are computed in float32): still the float head's token."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(500, 64, generator=g) * 0.05
    screen = GreedyScreen.build(weight, fbgemm=fbgemm)
    for scale in (1e-20, 1e-6, 1e6, 1e15):
        _check(screen, torch.randn(2, 64, generator=g) * scale)
