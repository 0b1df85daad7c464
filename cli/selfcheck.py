"""`swarm selfcheck`: build a tiny random model and check that our shards agree with themselves.

The interim main job of ``make demo``: writes a random Llama checkpoint with our own writer
(no ``transformers`` needed), loads it as three layer ranges, and checks that the chained
ranges equal the whole model, and that a KV-cached prefill plus single-token steps equal one
pass. Prints a short report and exits non-zero when a check fails.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import torch

    from swarm.shards import Head, Span

__all__ = ["selfcheck"]

_TOLERANCE = 1e-5
_VOCAB = 512
Result = tuple[str, float, bool]


def selfcheck(
    layers: int = typer.Option(6, help="Decoder layers in the generated model."),
    hidden: int = typer.Option(128, help="Hidden size of the generated model."),
    seed: int = typer.Option(0, help="Seed for weights and inputs."),
) -> None:
    """Generate a tiny random model, load it in 3 layer ranges, and check the numbers agree."""
    from swarm.lab.checkpoints import write_random_llama
    from swarm.shards import load_head, load_span, model_id
    from swarm.types import LayerRange

    if layers < 3:
        raise typer.BadParameter("need at least 3 layers to split into 3 ranges")
    console = Console()
    cuts = [0, layers // 3, 2 * layers // 3, layers]
    ranges = [LayerRange(a, b) for a, b in itertools.pairwise(cuts)]
    with tempfile.TemporaryDirectory(prefix="swarm-selfcheck-") as tmp:
        start = time.perf_counter()
        path = write_random_llama(
            Path(tmp) / "selfcheck-llama",
            num_layers=layers,
            hidden=hidden,
            heads=4,
            kv_heads=2,
            intermediate=2 * hidden,
            vocab=_VOCAB,
            seed=seed,
            layers_per_file=max(1, layers // 3),
        )
        whole = load_span(path, LayerRange(0, layers))
        spans = [load_span(path, r) for r in ranges]
        head = load_head(path)
        console.print(
            f"model [bold]{model_id(path)}[/]: {layers} layers, hidden {hidden}, "
            f"ranges {', '.join(str(r) for r in ranges)} "
            f"(written and loaded in {time.perf_counter() - start:.2f} s)"
        )
        results = _run_checks(head, whole, spans, seed)
    _report(console, results)
    if not all(ok for _, _, ok in results):
        raise typer.Exit(code=1)


def _run_checks(head: Head, whole: Span, spans: list[Span], seed: int) -> list[Result]:
    import torch

    from swarm.shards import KVCache

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _VOCAB, (2, 24), generator=gen)
    pos = torch.arange(24).expand(2, 24)
    with torch.inference_mode():
        x = head.embed(ids)  # (2, 24, hidden)
        expected = whole(x, pos)
        chained = x
        for span in spans:
            chained = span(chained, pos)
        caches = [KVCache.allocate(s.config, s.layers, 2, 24) for s in spans]
        outs = []
        for lo, hi in [(0, 16), *((t, t + 1) for t in range(16, 24))]:
            h = x[:, lo:hi]
            for span, cache in zip(spans, caches, strict=True):
                h = span(h, pos[:, lo:hi], cache)
            outs.append(h)
        cached = torch.cat(outs, dim=1)  # (2, 24, hidden)
        logits = head.logits(expected)  # (2, 24, vocab)
    logits_ok = bool(torch.isfinite(logits).all()) and logits.shape == (2, 24, _VOCAB)
    return [
        _compare("ranges chained == whole model", chained, expected),
        _compare("prefill 16 + 8 cached steps == one pass", cached, expected),
        (f"logits finite, shape (2, 24, {_VOCAB})", 0.0, logits_ok),
    ]


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor) -> Result:
    error = float((got - expected).abs().max())
    return name, error, error <= _TOLERANCE * max(1.0, float(expected.abs().max()))


def _report(console: Console, results: list[Result]) -> None:
    table = Table(title="swarm selfcheck")
    table.add_column("check")
    table.add_column("max abs error", justify="right")
    table.add_column("result")
    for name, error, ok in results:
        table.add_row(name, f"{error:.2e}", "[green]ok[/]" if ok else "[red]FAILED[/]")
    console.print(table)
