"""`swarm chat [MODEL] --initial-peers HOST:PORT`: an interactive chat through the swarm.

Multi-turn, streaming, the conversation rendered with the model's chat template, one
inference session kept across turns (each turn sends only its new tokens; see
`swarm.client.chat.Chat`). ``/reset`` forgets the conversation, ``/exit`` (or end of input)
leaves; Ctrl-C during an answer stops that answer, not the program.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import (
    DefaultModelArgument,
    DirectOption,
    HeadQuantOption,
    PeersOption,
    QuantRequirement,
    SpeculativeOption,
    VerboseOption,
    model_path,
    parse_head_quant,
    parse_quantization,
)
from .output import EventWriter

if TYPE_CHECKING:
    from swarm.client.chat import Chat
    from swarm.client.config import ClientConfig
    from swarm.client.sampling import SamplingConfig

__all__ = ["chat"]

HELP_LINE = "/reset forgets the conversation, /exit leaves, Ctrl-C stops an answer"


def chat(
    model: DefaultModelArgument = None,
    initial_peers: PeersOption = None,
    system: Annotated[str | None, typer.Option(help="A system message to start with.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer at most.")] = 256,
    max_length: Annotated[int, typer.Option(help="Tokens the conversation may hold.")] = 2048,
    temperature: Annotated[
        float | None, typer.Option(help="0 = greedy. Default: generation_config.json's, else 0.")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="0 = no top-k cut.")] = None,
    top_p: Annotated[float | None, typer.Option(help="1.0 = no top-p cut.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    swarm_key: Annotated[Path | None, typer.Option(help="Private-swarm key file.")] = None,
    verify: Annotated[
        str, typer.Option(help="Verification: none, spot-check:P, redundant:K or optimistic.")
    ] = "none",
    quant: QuantRequirement = None,
    head_quant: HeadQuantOption = "none",
    speculative: SpeculativeOption = "auto",
    direct: DirectOption = True,
    verbose: VerboseOption = False,
) -> None:
    """Chat with MODEL on the swarm reached through --initial-peers."""
    import trio

    from swarm.client.config import ClientConfig, SpeculationConfig
    from swarm.client.sampling import SamplingConfig
    from swarm.errors import ConfigError
    from swarm.net.punch import DEFAULT_PUNCH_CONFIG
    from swarm.net.swarm_key import load_swarm_key
    from swarm.shards.generation import GenerationDefaults

    if not initial_peers:
        raise ConfigError("no --initial-peers: give the host:port of a DHT node")
    if max_new_tokens < 1 or max_length <= max_new_tokens:
        raise ConfigError("--max-new-tokens must be at least 1 and below --max-length")
    path = model_path(model)
    config = ClientConfig(
        initial_peers=tuple(initial_peers),
        swarm_key=load_swarm_key(swarm_key) if swarm_key else None,
        verify=verify,
        quant=None if quant is None else parse_quantization(quant).value,
        head_quant=parse_head_quant(head_quant),
        speculation=SpeculationConfig(mode=speculative),
        direct=DEFAULT_PUNCH_CONFIG if direct else None,
    )
    chosen = GenerationDefaults.from_pretrained(path).resolve(temperature, top_k, top_p)
    sampling = SamplingConfig(chosen.temperature, chosen.top_k, chosen.top_p, seed)
    trio.run(_converse, path, config, sampling, system, max_new_tokens, max_length)


async def _converse(
    path: Path,
    config: ClientConfig,
    sampling: SamplingConfig,
    system: str | None,
    max_new_tokens: int,
    max_length: int,
) -> None:
    from rich.console import Console

    from swarm.client.chat import Chat
    from swarm.client.model import AsyncRemoteModel

    console = Console(highlight=False)
    async with (
        AsyncRemoteModel.open(path, config) as model,
        Chat.open(model, max_length=max_length, system=system) as conversation,
    ):
        console.print(f"[dim]chatting with {model.path.name}; {HELP_LINE}[/dim]")
        while True:
            line = await _read_line(console)
            if line is None or line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                await conversation.reset()
                console.print("[dim](conversation forgotten)[/dim]")
                continue
            if line.strip():
                await _answer(console, conversation, line.strip(), max_new_tokens, sampling)


async def _read_line(console: object) -> str | None:
    """One line from the user (None at end of input), read in a thread."""
    import trio
    from rich.console import Console

    assert isinstance(console, Console)

    def read() -> str | None:
        try:
            return console.input("[bold]you:[/bold] ")
        except EOFError:
            return None

    return await trio.to_thread.run_sync(read, abandon_on_cancel=True)


async def _answer(
    console: object,
    conversation: Chat,
    message: str,
    max_new_tokens: int,
    sampling: SamplingConfig,
) -> None:
    """Stream one answer; Ctrl-C (SIGINT) stops it and drops the turn."""
    from contextlib import aclosing

    import trio
    from rich.console import Console

    assert isinstance(console, Console)
    console.print("[bold]assistant:[/bold] ", end="")
    stopped = False
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                nonlocal stopped
                async for _ in signals:
                    stopped = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            write = EventWriter(may_roll_back=conversation.model.config.verify != "none")
            async with aclosing(conversation.send(message, max_new_tokens, sampling)) as events:
                async for event in events:
                    write(event)
            nursery.cancel_scope.cancel()
    sys.stdout.write("\n")
    if stopped:
        console.print("[dim](stopped; this turn is not kept)[/dim]")
