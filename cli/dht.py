"""`swarm dht`: run a bootstrap-only DHT node until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import PrivateGroupsOption, VerboseOption
from .output import setup_logging

if TYPE_CHECKING:
    from swarm.dht import DHTConfig
    from swarm.identity import Identity

__all__ = ["dht"]


def dht(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="UDP port (0 picks a free one).")] = 0,
    initial_peers: Annotated[
        list[str] | None,
        typer.Option("--initial-peers", help="host:port of a DHT node to join (repeatable)."),
    ] = None,
    swarm_key: Annotated[
        Path | None, typer.Option(help="Private-swarm key file (see `swarm key new`).")
    ] = None,
    identity: Annotated[
        Path | None, typer.Option(help="Identity key file (default ~/.config/swarm/...).")
    ] = None,
    private_groups: PrivateGroupsOption = "host",
    verbose: VerboseOption = False,
) -> None:
    """Run a bootstrap-only DHT node: print its host:port, serve until Ctrl-C / SIGTERM."""
    import trio

    from swarm.dht import DHTConfig
    from swarm.identity import Identity
    from swarm.net.swarm_key import load_swarm_key

    setup_logging(timestamps=True)  # the level: --verbose, set by swarm_cli.errors.command
    config = DHTConfig(
        host=host,
        port=port,
        initial_peers=tuple(initial_peers or ()),
        swarm_key=load_swarm_key(swarm_key) if swarm_key else None,
        private_groups=private_groups,  # type: ignore[arg-type]  # checked by DHTConfig
    )
    ident = Identity.load_or_create(identity)
    trio.run(_serve, ident, config)


async def _serve(identity: Identity, config: DHTConfig) -> None:
    import trio

    from swarm.dht import DHTNode
    from swarm.directory import AnnouncementProver

    # a bootstrap node stores records too: it keeps those of servers that answer first
    prover = AnnouncementProver(identity, swarm_key=config.swarm_key)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with DHTNode.open(identity, config, prover=prover) as node:
            print(f"DHT node {identity.peer_id} listening on {node.address}", flush=True)
            async for _ in signals:
                break
