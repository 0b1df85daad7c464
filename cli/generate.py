"""`swarm generate`: generate text (or ids) through the swarm, streaming to the terminal."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import trio
import typer
from rich.console import Console

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.client.sampling import SamplingConfig
from swarm.errors import ConfigError, SwarmError
from swarm.net.swarm_key import load_swarm_key

_err = Console(stderr=True)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"--ids must be comma-separated integers, got {text!r}") from exc
    if not ids:
        raise ConfigError("--ids is empty")
    return ids


def generate(
    model: Annotated[
        Path, typer.Argument(help="Model folder (the same checkpoint as the servers).")
    ],
    prompt: Annotated[str | None, typer.Argument(help="Prompt text.")] = None,
    initial_peers: Annotated[
        list[str] | None,
        typer.Option("--initial-peers", help="host:port of a DHT node (repeatable)."),
    ] = None,
    ids: Annotated[
        str | None, typer.Option(help="Comma-separated prompt token ids instead of text.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = no top-k cut.")] = 0,
    top_p: Annotated[float, typer.Option(help="1.0 = no top-p cut.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of streaming.")
    ] = False,
    swarm_key: Annotated[Path | None, typer.Option(help="Private-swarm key file.")] = None,
    no_push: Annotated[
        bool, typer.Option("--no-push", help="Relay every hop through the client.")
    ] = False,
    step_timeout: Annotated[float, typer.Option(help="Seconds one hop may take per step.")] = 30.0,
    verify: Annotated[
        str,
        typer.Option(help="Verification: none, spot-check:P, redundant:K or optimistic."),
    ] = "none",
    reputation: Annotated[
        Path | None, typer.Option(help="Reputation file (default ~/.cache/swarm/reputation.json).")
    ] = None,
) -> None:
    """Generate from PROMPT (or --ids) on the swarm reached through --initial-peers."""
    try:
        if (prompt is None) == (ids is None):
            raise ConfigError("give either a PROMPT or --ids, not both or neither")
        if not initial_peers:
            raise ConfigError("no --initial-peers: give the host:port of a DHT node")
        config = ClientConfig(
            initial_peers=tuple(initial_peers),
            swarm_key=load_swarm_key(swarm_key) if swarm_key else None,
            use_push=not no_push,
            step_timeout=step_timeout,
            verify=verify,
            **({"reputation_path": str(reputation)} if reputation else {}),
        )
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        request = prompt if prompt is not None else _parse_ids(ids or "")
        trio.run(_run, model, config, request, max_new_tokens, sampling, tuple(stop or ()), as_json)
    except SwarmError as exc:
        _err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from exc


async def _run(
    path: Path,
    config: ClientConfig,
    request: str | list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop: tuple[str, ...],
    as_json: bool,
) -> None:
    async with AsyncRemoteModel.open(path, config) as model:
        as_text = isinstance(request, str) and model.tokenizer is not None
        if as_json:
            result = await model.generate_detailed(request, max_new_tokens, sampling, stop)
            out = asdict(result)
            if result.text is None:
                del out["text"]
            print(json.dumps(out), flush=True)
            return
        async for token in model.stream(request, max_new_tokens, sampling, stop):
            sys.stdout.write(token.text if as_text else f"{token.id} ")
            sys.stdout.flush()
        sys.stdout.write("\n")
