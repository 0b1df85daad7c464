"""`swarm dht`: run a bootstrap-only DHT node until Ctrl-C or SIGTERM."""

from __future__ import annotations

import functools
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
    relay: Annotated[
        bool,
        typer.Option(
            help="Relay for servers that cannot be dialed and dial back for reachability "
            "checks, on TCP at the DHT's port number (--no-relay: DHT only)."
        ),
    ] = True,
    verbose: VerboseOption = False,
) -> None:
    """Run a bootstrap-only DHT node: print its host:port, serve until Ctrl-C / SIGTERM."""
    import trio

    from swarm.dht import AdmissionConfig, DHTConfig
    from swarm.identity import Identity
    from swarm.net.swarm_key import load_swarm_key

    setup_logging(timestamps=True)  # the level: --verbose, set by swarm_cli.errors.command
    config = DHTConfig(
        host=host,
        port=port,
        initial_peers=tuple(initial_peers or ()),
        swarm_key=load_swarm_key(swarm_key) if swarm_key else None,
        admission=AdmissionConfig(
            private_groups=private_groups,  # type: ignore[arg-type]  # a name, checked
        ),
    )
    ident = Identity.load_or_create(identity)
    trio.run(_serve, ident, config, relay)


async def _serve(identity: Identity, config: DHTConfig, relay: bool) -> None:
    import trio

    from swarm.dht import DHTNode
    from swarm.directory import AnnouncementProver
    from swarm.errors import unwrap_group
    from swarm.server.relay_node import serve_relay_node

    # a bootstrap node stores records too: it keeps those of servers that answer first
    prover = AnnouncementProver(identity, swarm_key=config.swarm_key)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with DHTNode.open(identity, config, prover=prover) as node, trio.open_nursery() as n:
            if relay:
                relay_node = functools.partial(serve_relay_node, swarm_key=config.swarm_key)
                try:  # the DHT's port number on TCP if it is free, else any
                    port, _ = await n.start(relay_node, identity, node, config.host, node.port)
                except BaseException as exc:  # the listener's OSError may come in a group
                    if not isinstance(unwrap_group(exc), OSError):
                        raise
                    port, _ = await n.start(relay_node, identity, node, config.host, 0)
                print(f"relay and dial-back on tcp {config.host}:{port}", flush=True)
            print(f"DHT node {identity.peer_id} listening on {node.address}", flush=True)
            async for _ in signals:
                break
            n.cancel_scope.cancel()
