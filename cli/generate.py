"""`swarm generate`: generate text (or ids) through the swarm, streaming to the terminal."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .coverage import fill_hint
from .options import (
    HeadQuantOption,
    QuantRequirement,
    SpeculativeOption,
    VerboseOption,
    parse_head_quant,
    parse_quantization,
)
from .output import EventWriter, warn

if TYPE_CHECKING:
    from swarm.client.config import ClientConfig
    from swarm.client.model import AsyncRemoteModel
    from swarm.client.sampling import SamplingConfig

__all__ = ["generate"]


def _parse_ids(text: str) -> list[int]:
    from swarm.errors import ConfigError

    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"--ids must be comma-separated integers, got {text!r}") from exc
    if not ids:
        raise ConfigError("--ids is empty")
    return ids


def generate(
    model: Annotated[
        str,
        typer.Argument(
            help="Model folder, GGUF file or hub name (the same checkpoint as the servers)."
        ),
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
    temperature: Annotated[
        float | None,
        typer.Option(help="0 = greedy (default: the model's generation_config.json, else 0)."),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="0 = no top-k cut (default: generation_config.json).")
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="1.0 = no top-p cut (default: generation_config.json).")
    ] = None,
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
    wait: Annotated[
        float,
        typer.Option(help="Seconds to wait until online servers cover every block (0: no wait)."),
    ] = 0.0,
    verify: Annotated[
        str,
        typer.Option(help="Verification: none, spot-check:P, redundant:K or optimistic."),
    ] = "none",
    reputation: Annotated[
        Path | None, typer.Option(help="Reputation file (default ~/.cache/swarm/reputation.json).")
    ] = None,
    quant: QuantRequirement = None,
    head_quant: HeadQuantOption = "none",
    speculative: SpeculativeOption = "auto",
    direct: Annotated[
        bool,
        typer.Option(
            help="Try a direct connection to relayed servers (TCP simultaneous open "
            "coordinated through the relay, beside the relayed channel: a failed one keeps "
            "the relay); the --json route marks them upgraded. --no-direct: never."
        ),
    ] = True,
    verbose: VerboseOption = False,
) -> None:
    """Generate from PROMPT (or --ids) on the swarm reached through --initial-peers."""
    import trio

    from swarm.client.config import ClientConfig, PipelineConfig, SpeculationConfig
    from swarm.client.sampling import SamplingConfig
    from swarm.errors import ConfigError
    from swarm.net.punch import DEFAULT_PUNCH_CONFIG
    from swarm.net.swarm_key import load_swarm_key
    from swarm.shards.generation import GenerationDefaults
    from swarm.shards.hub import resolve_checkpoint

    if (prompt is None) == (ids is None):
        raise ConfigError("give either a PROMPT or --ids, not both or neither")
    if not initial_peers:
        raise ConfigError("no --initial-peers: give the host:port of a DHT node")
    if wait < 0:
        raise ConfigError(f"--wait must be 0 or more seconds, got {wait:g}")
    config = ClientConfig(
        initial_peers=tuple(initial_peers),
        swarm_key=load_swarm_key(swarm_key) if swarm_key else None,
        step_timeout=step_timeout,
        verify=verify,
        quant=None if quant is None else parse_quantization(quant).value,
        head_quant=parse_head_quant(head_quant),
        pipeline=PipelineConfig(use_push=not no_push),
        speculation=SpeculationConfig(mode=speculative),
        direct=DEFAULT_PUNCH_CONFIG if direct else None,
    )
    if reputation is not None:
        config = dataclasses.replace(
            config, records=dataclasses.replace(config.records, reputation_path=str(reputation))
        )
    path = resolve_checkpoint(model)
    chosen = GenerationDefaults.from_pretrained(path).resolve(temperature, top_k, top_p)
    sampling = SamplingConfig(chosen.temperature, chosen.top_k, chosen.top_p, seed)
    request = prompt if prompt is not None else _parse_ids(ids or "")
    job = _Job(path, config, request, max_new_tokens, sampling, tuple(stop or ()), wait)
    trio.run(_run, job, as_json)


class _Job:
    """One `swarm generate` request, as parsed from the command line."""

    def __init__(
        self,
        path: Path,
        config: ClientConfig,
        request: str | list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        stop: tuple[str, ...],
        wait: float,
    ) -> None:
        self.path, self.config, self.request = path, config, request
        self.max_new_tokens, self.sampling, self.stop, self.wait = (
            max_new_tokens,
            sampling,
            stop,
            wait,
        )


async def _run(job: _Job, as_json: bool) -> None:
    import trio

    from swarm.client.model import AsyncRemoteModel
    from swarm.errors import RoutingError

    async with AsyncRemoteModel.open(job.path, job.config) as model:
        _warn_about_length(model, job)
        deadline = trio.current_time() + job.wait
        while True:
            await wait_for_coverage(model, job, deadline)
            answered = _Answered()
            try:
                await _generate(model, job, as_json, answered)
                return
            except RoutingError as exc:
                # a record seen in the wait may be a crashed server's, outliving it until
                # its TTL: with nothing printed yet and time left, wait on for coverage
                if answered.any or trio.current_time() >= deadline:
                    raise
                warn(f"{exc}; waiting on for coverage (--wait)")
                await trio.sleep(min(1.0, deadline - trio.current_time()))


class _Answered:
    """Whether a generation printed anything yet (then it cannot start over)."""

    any = False


async def _generate(model: AsyncRemoteModel, job: _Job, as_json: bool, answered: _Answered) -> None:
    if as_json:
        result = await model.generate_detailed(
            job.request, job.max_new_tokens, job.sampling, job.stop
        )
        out = asdict(result)
        if result.text is None:
            del out["text"]
        answered.any = True
        print(json.dumps(out), flush=True)
        return
    as_text = isinstance(job.request, str) and model.tokenizer is not None
    policy = job.config.verify != "none"
    write = EventWriter(as_ids=not as_text, may_roll_back=policy)
    async with model.stream(job.request, job.max_new_tokens, job.sampling, job.stop) as events:
        async for event in events:
            answered.any = True
            write(event)
    sys.stdout.write("\n")
    if write.rollbacks:
        warn(
            f"verification proved a lie and rolled back {write.rollbacks} time(s); "
            "the text above is the final one"
        )


def _warn_about_length(model: AsyncRemoteModel, job: _Job) -> None:
    positions = model.model_config.max_position_embeddings
    prompt = len(model.encode(job.request))
    if prompt + job.max_new_tokens > positions:
        warn(
            f"the prompt ({prompt} tokens) plus --max-new-tokens {job.max_new_tokens} goes past "
            f"the model's {positions} positions; tokens beyond position {positions} are "
            "unreliable (shorten the prompt or lower --max-new-tokens)"
        )


async def wait_for_coverage(model: AsyncRemoteModel, job: _Job, deadline: float) -> None:
    """Return once online servers that did not fail their last ping cover every block; at
    ``deadline`` (after one look when ``--wait`` is 0) raise `RoutingError` naming the
    missing blocks and the `swarm serve` that fills them."""
    import trio

    from swarm.directory import missing_ranges
    from swarm.errors import RoutingError

    directory = model.directory
    for look in itertools.count(1):
        servers = await directory.servers(refresh=True)
        live = [s for s in servers if not directory.unreachable(s)]
        gaps = missing_ranges(live, model.model_config.num_hidden_layers)
        if not gaps:
            return
        left = deadline - trio.current_time()
        if left <= 0 and look >= 2:  # a second look, as routing does, for a slow DHT reply
            waited = f" after waiting {job.wait:g} s" if job.wait else " (--wait S waits for it)"
            hint = directory.absence_hint() or fill_hint(
                gaps, str(job.path), job.config.initial_peers
            )
            raise RoutingError(hint + waited)
        await trio.sleep(min(1.0, max(left, 0.0)))
