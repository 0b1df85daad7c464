"""`swarm serve MODEL --layers A:B`: serve a layer range of a checkpoint to the swarm."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from .options import (
    PrivateGroupsOption,
    VerboseOption,
    identity_path,
    parse_layers,
    parse_quantization,
)
from .output import setup_logging, warn

if TYPE_CHECKING:
    from swarm.net.methods import HandlerRegistry
    from swarm.server.config import ServerConfig
    from swarm.server.handlers import ServingHandlers
    from swarm.server.server import ServerReady

    WrapHandlers = Callable[[ServingHandlers], HandlerRegistry]

__all__ = ["WRAP_HANDLERS", "serve"]

err = Console(stderr=True)

# The handler-wrapping seam of `Server` for this process's `serve`: None (honest) unless the
# lab's liar entry point (`swarm_cli.lab_serve`) set it; `swarm serve` itself has no option
# for it.
WRAP_HANDLERS: ContextVar[WrapHandlers | None] = ContextVar("WRAP_HANDLERS", default=None)


def serve(
    model: Annotated[
        str,
        typer.Argument(help="Model folder, GGUF file, or hub name (org/name, from its cache)."),
    ],
    layers: Annotated[
        str, typer.Option(help="Half-open range START:STOP (0:12 serves 0..11), or 'auto'.")
    ] = "auto",
    num_blocks: Annotated[
        int | None,
        typer.Option(help="With --layers auto: how many blocks (default: what free memory holds)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface for RPC and the DHT.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="RPC TCP port (0 picks a free one).")] = 0,
    dht_port: Annotated[int, typer.Option(help="DHT UDP port (0 picks a free one).")] = 0,
    initial_peers: Annotated[
        list[str] | None,
        typer.Option("--initial-peers", help="host:port of a DHT node to join (repeatable)."),
    ] = None,
    public_addr: Annotated[
        str | None, typer.Option(help="Host others should dial (default: --host).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    quant: Annotated[
        str | None,
        typer.Option(
            help="Keep the layers' weights as int8, int4 or none (float). Default: the "
            "checkpoint's own where a kernel exists (GGUF Q4_0/Q4_1: int4, Q8_0: int8), "
            "else none. CPU only; other devices serve float weights."
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option(
            help="Identity key file, created if missing (default: a fresh identity per "
            "process, so servers on one machine never collide)."
        ),
    ] = None,
    identity_name: Annotated[
        str | None,
        typer.Option(
            help="Keep a persistent identity under this name "
            "(~/.config/swarm/identities/NAME.key); one name per server process."
        ),
    ] = None,
    swarm_key: Annotated[
        Path | None, typer.Option(help="Private-swarm key file (see `swarm key new`).")
    ] = None,
    max_sessions: Annotated[int, typer.Option(help="Concurrent inference sessions.")] = 64,
    max_length: Annotated[int, typer.Option(help="Tokens per session.")] = 8192,
    cache_tokens: Annotated[
        int | None,
        typer.Option(
            help="KV cache budget: max_length x batch over all sessions (default: what free "
            "memory holds after the blocks, at most 65536)."
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int, typer.Option(help="Decode tokens of concurrent sessions run as one batch.")
    ] = 1024,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            help="Prompt/forward tokens per batch, between other sessions' steps "
            "(default: measured, a chunk that costs about one decode step)."
        ),
    ] = None,
    batching: Annotated[
        bool, typer.Option(help="Batch concurrent sessions' steps (--no-batching: one at a time).")
    ] = True,
    num_threads: Annotated[int, typer.Option(help="torch threads for compute.")] = 1,
    announce_ttl: Annotated[
        float, typer.Option(help="Seconds a DHT record lives; re-announced every half.")
    ] = 60.0,
    rebalance: Annotated[
        bool | None,
        typer.Option(
            "--rebalance/--no-rebalance",
            help="Move to the layers the swarm needs most, now and then (default: only with "
            "--layers auto).",
        ),
    ] = None,
    balance_period: Annotated[
        float,
        typer.Option(help="Mean seconds between rebalancing checks (each wait is 0.5-1.5x it)."),
    ] = 120.0,
    balance_quality: Annotated[
        float,
        typer.Option(
            help="Move when the swarm's bottleneck throughput now is below this share of "
            "what it would be after the move (Petals' 0.75)."
        ),
    ] = 0.75,
    private_groups: PrivateGroupsOption = "host",
    relay: Annotated[
        bool,
        typer.Option(help="Relay for servers that cannot be dialed, while reachable (--no-relay)."),
    ] = True,
    port_mapping: Annotated[
        bool,
        typer.Option(
            help="When others cannot dial this server, ask the router (UPnP IGD, needs the "
            "miniupnpc package; else PCP or NAT-PMP) to forward the port "
            "(--no-port-mapping: never)."
        ),
    ] = True,
    direct: Annotated[
        bool,
        typer.Option(
            help="Try a direct connection (TCP simultaneous open coordinated through the "
            "relay) to relayed next-hop servers, so pushes to them skip the relay (a failed "
            "one keeps the relay). --no-direct: never."
        ),
    ] = True,
    timings_cache: Annotated[
        bool,
        typer.Option(
            help="Keep the throughput measured once online in ~/.cache/swarm/timings; a later "
            "start of the same model, range, weights, dtype and device announces it at once and "
            "measures again online (--no-timings-cache: go online on one layer timed and scaled)."
        ),
    ] = True,
    verbose: VerboseOption = False,
) -> None:
    """Serve a layer range of MODEL and announce it in the DHT until Ctrl-C / SIGTERM.

    Without --identity or --identity-name each process gets its own fresh identity; a
    server refuses to start when a live server elsewhere already uses its identity.
    """
    import trio

    from swarm.dht import AdmissionConfig, DHTConfig
    from swarm.net.punch import DEFAULT_PUNCH_CONFIG
    from swarm.server.balance import BalanceConfig
    from swarm.server.compute import ComputeConfig
    from swarm.server.config import ServerConfig
    from swarm.server.reachability import ReachabilityConfig
    from swarm.server.sessions import SessionLimits
    from swarm.shards.hub import resolve_checkpoint
    from swarm.types import LayerRange

    setup_logging(timestamps=True)  # the level: --verbose, set by swarm_cli.errors.command
    path = resolve_checkpoint(model)
    num_layers = _check_model_and_device(path, device)
    chosen = None if layers == "auto" else LayerRange(*parse_layers(layers, num_layers))
    if num_blocks is not None and chosen is not None:
        warn("--num-blocks is ignored with an explicit --layers range")
    if num_blocks is not None and num_blocks > num_layers:
        warn(
            f"--num-blocks {num_blocks} is more than the model's {num_layers} blocks; "
            f"serving all {num_layers}"
        )
        num_blocks = num_layers
    config = ServerConfig(
        model=path,
        layers=chosen,
        num_blocks=num_blocks,
        host=host,
        port=port,
        public_host=public_addr,
        device=device,
        dtype=dtype,
        quant=None if quant is None else parse_quantization(quant),
        num_threads=num_threads,
        identity_path=identity_path(identity, identity_name),
        swarm_key_path=swarm_key,
        dht=DHTConfig(
            host=host,
            port=dht_port,
            initial_peers=tuple(initial_peers or ()),
            admission=AdmissionConfig(
                private_groups=private_groups,  # type: ignore[arg-type]  # a name, checked
            ),
        ),
        limits=SessionLimits(
            max_sessions=max_sessions, max_length=max_length, cache_tokens=cache_tokens or 65536
        ),
        cache_tokens_from_memory=cache_tokens is None,
        compute=ComputeConfig(
            max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk, batching=batching
        ),
        announce_ttl=announce_ttl,
        reachability=ReachabilityConfig(
            offer_relay=relay,
            port_mapping=port_mapping,
            direct=DEFAULT_PUNCH_CONFIG if direct else None,
        ),
        balance=BalanceConfig(enabled=rebalance, period=balance_period, quality=balance_quality),
        timings_dir=Path("~/.cache/swarm/timings").expanduser() if timings_cache else None,
    )
    trio.run(_run, config, WRAP_HANDLERS.get())


def _check_model_and_device(model: Path, device: str) -> int:
    """The model's layer count; raises for a model or device this machine cannot serve."""
    import torch

    from swarm.errors import ConfigError
    from swarm.server.device import resolve_device
    from swarm.shards import ModelConfig
    from swarm.shards.gguf_header import is_gguf

    if not (model.is_dir() or is_gguf(model)):
        raise ConfigError(
            f"model {model} does not exist (or is neither a folder nor a GGUF file); give a "
            "Hugging Face-format checkpoint folder (config.json, *.safetensors, tokenizer.json) "
            "or a .gguf file"
        )
    num_layers = ModelConfig.from_pretrained(model).num_hidden_layers
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device}: CUDA is not available on this machine; use --device cpu"
        )
    resolve_device(device)
    return num_layers


async def _run(config: ServerConfig, wrap: WrapHandlers | None = None) -> None:
    """Start the server; the first Ctrl-C / SIGTERM drains it once ready and stops start-up
    at once before that; a second one stops at once."""
    import trio

    from swarm.server.server import Server

    status = err.status("starting", spinner="dots") if sys.stderr.isatty() else None

    def progress(message: str) -> None:
        if status is not None:
            status.update(message)
        else:
            err.print(message, highlight=False)

    server = Server(config, on_progress=progress, wrap_handlers=wrap)
    interrupted = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run_server(*, task_status: trio.TaskStatus[ServerReady]) -> None:
                await server.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop watching signals

            async def watch_signals() -> None:
                nonlocal interrupted
                async for _ in signals:
                    if ready is None or interrupted:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return
                    interrupted = True
                    err.print("stopping: announcing draining, finishing running steps")
                    server.request_stop()

            ready: ServerReady | None = None
            nursery.start_soon(watch_signals)
            if status is not None:
                status.start()
            try:
                ready = await nursery.start(run_server)
            finally:
                if status is not None:
                    status.stop()
            _report_ready(ready, config)
    if interrupted and ready is None:
        raise KeyboardInterrupt


def _report_ready(ready: ServerReady, config: ServerConfig) -> None:
    print(
        f"swarm server ready: peer {ready.peer_id} at {ready.host}:{ready.port} "
        f"layers {ready.layers} model {ready.model_id} dht {ready.dht_address} "
        f"throughput {ready.throughput:.1f} tok/s reachability {ready.reachability}"
        + (f" relays {','.join(ready.relays)}" if ready.relays else ""),
        flush=True,
    )
    if not config.dht.initial_peers:
        warn(
            "no --initial-peers: this server starts a swarm of its own; other servers and "
            f"clients join it with --initial-peers {ready.dht_address}"
        )
