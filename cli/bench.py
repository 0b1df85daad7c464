"""`swarm bench MODEL --initial-peers ...`: how a live swarm holds up under concurrent users.

For each concurrency level (1, 2, 4, 8, 16 by default) it runs that many greedy
generations at once, each its own inference session, from synthetic prompts of
``--prompt-length`` token ids, and reports time to first token and per-token latency
(p50/p95 over all sessions) and the aggregate tokens per second (new tokens of all sessions
/ wall time of the level). It is how an operator sizes a swarm.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import VerboseOption

if TYPE_CHECKING:
    from rich.table import Table

    from swarm.client.config import ClientConfig
    from swarm.client.model import AsyncRemoteModel

__all__ = ["BenchRow", "bench", "run_level"]

DEFAULT_LEVELS = "1,2,4,8,16"


@dataclass(frozen=True)
class BenchRow:
    """What one concurrency level measured (seconds, tokens per second)."""

    sessions: int
    ttft_p50: float
    ttft_p95: float
    token_p50: float
    token_p95: float
    tokens_per_second: float  # new tokens of all sessions / wall time of the level
    new_tokens: int  # generated in all (a session may stop early at EOS)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _prompt(index: int, length: int, vocab: int) -> list[int]:
    """A distinct synthetic prompt per session (ids away from the special ones at 0..2)."""
    return [3 + (index * 7919 + k * 31) % max(vocab - 3, 1) for k in range(length)]


async def run_level(
    model: AsyncRemoteModel, sessions: int, prompt_length: int, new_tokens: int
) -> BenchRow:
    """Run ``sessions`` generations at once on ``model``; raises what generation raises."""
    import trio

    vocab = model.model_config.vocab_size
    ttfts: list[float] = []
    steps: list[float] = []
    produced = [0]

    async def one(index: int) -> None:
        result = await model.generate_detailed(_prompt(index, prompt_length, vocab), new_tokens)
        ttfts.append(result.ttft)
        steps.extend(result.timings[1:])
        produced[0] += len(result.ids)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(sessions):
            nursery.start_soon(one, index)
    wall = time.perf_counter() - started
    return BenchRow(
        sessions,
        _percentile(ttfts, 50),
        _percentile(ttfts, 95),
        _percentile(steps, 50),
        _percentile(steps, 95),
        produced[0] / max(wall, 1e-9),
        produced[0],
    )


def _parse_levels(text: str) -> list[int]:
    from swarm.errors import ConfigError

    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"--concurrency must be comma-separated integers, got {text!r}") from exc
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency needs session counts of 1 or more, got {text!r}")
    return levels


def bench(
    model: Annotated[
        Path, typer.Argument(help="Model folder or GGUF file (the same checkpoint as the servers).")
    ],
    initial_peers: Annotated[
        list[str] | None,
        typer.Option("--initial-peers", help="host:port of a DHT node (repeatable)."),
    ] = None,
    concurrency: Annotated[
        str, typer.Option(help="Comma-separated numbers of concurrent sessions.")
    ] = DEFAULT_LEVELS,
    prompt_length: Annotated[int, typer.Option(help="Prompt tokens per session.")] = 16,
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate per session.")] = 32,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON list of rows instead of a table.")
    ] = False,
    swarm_key: Annotated[Path | None, typer.Option(help="Private-swarm key file.")] = None,
    step_timeout: Annotated[float, typer.Option(help="Seconds one hop may take per step.")] = 60.0,
    verbose: VerboseOption = False,
) -> None:
    """Measure TTFT, per-token latency and aggregate tokens/s of the swarm at each
    concurrency level."""
    import trio

    from swarm.client.config import ClientConfig
    from swarm.errors import ConfigError
    from swarm.net.swarm_key import load_swarm_key

    if not initial_peers:
        raise ConfigError("no --initial-peers: give the host:port of a DHT node")
    if prompt_length < 1 or new_tokens < 1:
        raise ConfigError("--prompt-length and --new-tokens must be 1 or more")
    levels = _parse_levels(concurrency)
    config = ClientConfig(
        initial_peers=tuple(initial_peers),
        swarm_key=load_swarm_key(swarm_key) if swarm_key else None,
        step_timeout=step_timeout,
    )
    rows = trio.run(_sweep, model, config, levels, prompt_length, new_tokens, not as_json)
    if as_json:
        print(json.dumps([asdict(row) for row in rows]), flush=True)


async def _sweep(
    path: Path,
    config: ClientConfig,
    levels: list[int],
    prompt_length: int,
    new_tokens: int,
    table: bool,
) -> list[BenchRow]:
    from rich.console import Console
    from rich.live import Live

    from swarm.client.model import AsyncRemoteModel

    rows: list[BenchRow] = []
    console = Console()
    async with AsyncRemoteModel.open(path, config) as model:
        await model.generate(_prompt(0, prompt_length, model.model_config.vocab_size), 2)
        with Live(_table(rows), console=console, auto_refresh=False) if table else _Quiet() as live:
            for sessions in levels:
                rows.append(await run_level(model, sessions, prompt_length, new_tokens))
                live.update(_table(rows), refresh=True)
    return rows


class _Quiet:
    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *args: object, **kwargs: object) -> None:
        return None


def _table(rows: list[BenchRow]) -> Table:
    from rich.table import Table

    table = Table(title="swarm bench")
    for name in ("sessions", "TTFT p50", "TTFT p95", "per token p50", "per token p95", "tokens/s"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            str(row.sessions),
            f"{row.ttft_p50 * 1e3:.1f} ms",
            f"{row.ttft_p95 * 1e3:.1f} ms",
            f"{row.token_p50 * 1e3:.1f} ms",
            f"{row.token_p95 * 1e3:.1f} ms",
            f"{row.tokens_per_second:.1f}",
        )
    return table
