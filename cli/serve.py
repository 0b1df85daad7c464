"""`swarm serve MODEL --layers A:B`: serve a layer range of a checkpoint to the swarm."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import trio
import typer
from rich.console import Console

from swarm.errors import SwarmError

err = Console(stderr=True)


def serve(
    model: Annotated[Path, typer.Argument(help="Hugging Face-format model folder.")],
    layers: Annotated[
        str, typer.Option(help="Half-open range START:STOP (0:12 serves 0..11), or 'auto'.")
    ] = "auto",
    num_blocks: Annotated[
        int | None, typer.Option(help="With --layers auto: how many blocks (default all).")
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
    identity: Annotated[
        Path | None, typer.Option(help="Identity key (default ~/.config/swarm/identity.key).")
    ] = None,
    swarm_key: Annotated[Path | None, typer.Option(help="Private-swarm key file.")] = None,
    max_sessions: Annotated[int, typer.Option(help="Concurrent inference sessions.")] = 64,
    max_length: Annotated[int, typer.Option(help="Tokens per session.")] = 8192,
    cache_tokens: Annotated[
        int, typer.Option(help="KV cache budget: max_length x batch over all sessions.")
    ] = 65536,
    num_threads: Annotated[int, typer.Option(help="torch threads for compute.")] = 1,
    announce_ttl: Annotated[
        float, typer.Option(help="Seconds a DHT record lives; re-announced every half.")
    ] = 60.0,
    testing_adversary: Annotated[
        str | None,
        typer.Option(
            "--testing-adversary",
            help="TESTING ONLY: make this server lie (see swarm.testing.adversaries).",
            hidden=True,
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Serve a layer range of MODEL and announce it in the DHT until Ctrl-C / SIGTERM."""
    from swarm.dht import DHTConfig
    from swarm.server.config import ServerConfig
    from swarm.server.sessions import SessionLimits
    from swarm.types import LayerRange

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = ServerConfig(
            model=model,
            layers=None if layers == "auto" else LayerRange.parse(layers),
            num_blocks=num_blocks,
            host=host,
            port=port,
            public_host=public_addr,
            device=device,
            dtype=dtype,
            num_threads=num_threads,
            identity_path=identity,
            swarm_key_path=swarm_key,
            dht=DHTConfig(host=host, port=dht_port, initial_peers=tuple(initial_peers or ())),
            limits=SessionLimits(
                max_sessions=max_sessions, max_length=max_length, cache_tokens=cache_tokens
            ),
            announce_ttl=announce_ttl,
            adversary=testing_adversary,
        )
        trio.run(_run, config)
    except (SwarmError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


async def _run(config: object) -> None:
    from swarm.server.config import ServerConfig
    from swarm.server.server import Server

    assert isinstance(config, ServerConfig)  # built above; not peer input
    wrap = None
    if config.adversary:
        from swarm.testing.adversaries import adversary_wrapper

        wrap = adversary_wrapper(config.adversary)
    status = err.status("starting", spinner="dots") if sys.stderr.isatty() else None
    if status is not None:
        status.start()

    def progress(message: str) -> None:
        if status is not None:
            status.update(message)
        else:
            err.print(message, highlight=False)

    server = Server(config, on_progress=progress, wrap_handlers=wrap)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                ready = await nursery.start(server.run)
            finally:
                if status is not None:
                    status.stop()
            print(
                f"swarm server ready: peer {ready.peer_id} at {ready.host}:{ready.port} "
                f"layers {ready.layers} model {ready.model_id} dht {ready.dht_address} "
                f"throughput {ready.throughput:.1f} tok/s",
                flush=True,
            )
            async for _ in signals:
                err.print("stopping: announcing draining, finishing running steps")
                server.request_stop()
                break
