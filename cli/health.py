"""`swarm status` (who serves what, how well) and `swarm monitor` (canary accuracy)."""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from .coverage import fill_hint
from .options import KeyOption, PeersOption, VerboseOption

if TYPE_CHECKING:
    from swarm.client.discovery import Discovery
    from swarm.client.routing import ServerView
    from swarm.net.pool import ConnectionPool

# piped output keeps whole table rows on one line (rich would wrap at 80 columns)
console = Console() if sys.stdout.isatty() else Console(width=160)
err = Console(stderr=True)


@asynccontextmanager
async def _discovery(
    model: Path, initial_peers: Sequence[str], swarm_key: Path | None
) -> AsyncIterator[tuple[Discovery, ConnectionPool, int]]:
    from swarm.client.config import ClientConfig
    from swarm.client.discovery import Discovery, join_as_client
    from swarm.errors import ConfigError
    from swarm.net.swarm_key import load_swarm_key
    from swarm.shards import ModelConfig, model_id

    if not initial_peers:
        raise ConfigError("no --initial-peers: give the host:port of a DHT node")
    key = load_swarm_key(swarm_key) if swarm_key else None
    # a look, not a session: no direct upgrades (the table shows the announced paths)
    config = ClientConfig(initial_peers=tuple(initial_peers), swarm_key=key, direct=None)
    layers = ModelConfig.from_pretrained(model).num_hidden_layers
    async with join_as_client(config) as (pool, dht):
        yield Discovery(dht, pool, model_id(model), layers, config), pool, layers


def _coverage(servers: Sequence[ServerView], layers: int) -> Table:
    table = Table(title="block coverage (online servers per block)")
    table.add_column("blocks")
    table.add_column("servers", justify="right")
    from swarm.directory import servers_per_block

    counts = servers_per_block(servers, layers)
    start = 0
    for block in range(1, layers + 1):
        if block == layers or counts[block] != counts[start]:
            style = "red" if counts[start] == 0 else ""
            table.add_row(
                f"{start}:{block}",
                f"[{style}]{counts[start]}[/{style}]" if style else str(counts[start]),
            )
            start = block
    return table


def _moves(servers: Sequence[ServerView]) -> Table | None:
    """Who moved (rebalancing), from where to where, why, and who is moving now."""
    import time

    rows = []
    for s in servers:
        if s.moving_to is not None:
            rows.append((s.peer_id.short(), str(s.layers), str(s.moving_to), "loading", "now", "-"))
        move = s.last_move
        if move is not None:
            ago = max(0.0, time.time() - move.at)
            gain = f"{move.gain:.2f}x" if move.gain > 0 else "-"
            rows.append((s.peer_id.short(), str(move.from_range), str(move.to_range),
                         move.reason.value, f"{ago:.0f} s ago", gain))  # fmt: skip
    if not rows:
        return None
    table = Table(title="moves (rebalancing)")
    for column in ("peer", "from", "to", "why", "when", "bottleneck gain"):
        table.add_column(column)
    for row in sorted(rows, key=lambda r: r[4]):
        table.add_row(*row)
    return table


def status(
    model: Annotated[
        str, typer.Argument(help="Model folder, GGUF file or hub name (identifies the model).")
    ],
    initial_peers: PeersOption = None,
    swarm_key: KeyOption = None,
    reputation: Annotated[
        Path | None, typer.Option(help="Reputation file (default ~/.cache/swarm/...).")
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Block coverage, and per server: range, state, latency, throughput, load, audits."""
    import trio

    from swarm.shards.hub import resolve_checkpoint

    trio.run(_status, resolve_checkpoint(model), initial_peers or [], swarm_key, reputation)


async def _status(
    model: Path, initial_peers: list[str], swarm_key: Path | None, reputation: Path | None
) -> None:
    from swarm.verify.reputation import Reputation

    rep = Reputation.load(reputation)
    async with _discovery(model, initial_peers, swarm_key) as (found, _pool, layers):
        servers = await found.refresh()
        await found.measure_pings()
        pings = found.pings
    console.print(_coverage(servers, layers))
    from swarm.directory import missing_ranges

    moves = _moves(servers)
    if moves is not None:
        console.print(moves)
    gaps = missing_ranges(servers, layers)
    if gaps:
        err.print(fill_hint(gaps, str(model), initial_peers), highlight=False, markup=False)
    table = Table(title=f"{len(servers)} servers")
    for column in (
        "peer",
        "address",
        "path",
        "reachability",
        "layers",
        "state",
        "weights",
        "ping",
        "tok/s",
        "sessions",
        "free cache",
        "audits ok/failed",
        "reputation",
    ):
        table.add_column(column, justify="right" if column not in ("peer", "address") else "left")
    for s in sorted(servers, key=lambda s: (s.layers.start, s.layers.stop, str(s.peer_id))):
        record = rep.records().get(s.peer_id)
        rtt = pings.get(s.peer_id, math.nan)
        standing = "banned" if rep.is_banned(s.peer_id) else ("new" if record is None else "ok")
        audits = f"{record.passed}/{record.failed}" if record else "-"
        table.add_row(
            s.peer_id.short(),
            s.address,
            s.path,
            s.reachability,
            str(s.layers),
            s.state,
            f"{s.dtype} {s.quantization}",
            "-" if math.isnan(rtt) else f"{rtt * 1e3:.1f} ms",
            f"{s.throughput:.0f}",
            str(s.active_sessions),
            str(s.free_cache_tokens),
            audits,
            standing,
        )
    console.print(table)


def monitor(
    model: Annotated[
        str, typer.Argument(help="Local reference copy of the model (folder, GGUF, hub name).")
    ],
    initial_peers: PeersOption = None,
    swarm_key: KeyOption = None,
    rounds: Annotated[int, typer.Option(help="Canary rounds (0 = until Ctrl-C).")] = 3,
    interval: Annotated[float, typer.Option(help="Seconds between rounds.")] = 5.0,
    timeout: Annotated[float, typer.Option(help="Seconds a server may take per canary.")] = 10.0,
    verbose: VerboseOption = False,
) -> None:
    """Send canary inputs with known answers to every server; report accuracy and uptime."""
    import trio

    from swarm.shards.hub import resolve_checkpoint

    path = resolve_checkpoint(model)
    try:
        trio.run(_monitor, path, initial_peers or [], swarm_key, rounds, interval, timeout)
    except KeyboardInterrupt:
        if rounds:
            raise  # stopped before the rounds asked for: an interruption
        err.print("stopped")


async def _monitor(
    model: Path,
    initial_peers: list[str],
    swarm_key: Path | None,
    rounds: int,
    interval: float,
    timeout: float,
) -> None:
    import trio

    from swarm.types import LayerRange, PeerId, parse_address
    from swarm.verify.health import Canary, ServerHealth, make_canaries, probe_safely

    health: dict[PeerId, ServerHealth] = {}
    canaries: dict[LayerRange, Canary] = {}
    async with _discovery(model, initial_peers, swarm_key) as (found, pool, _layers):
        round_no = 0
        while rounds == 0 or round_no < rounds:
            servers = [s for s in await found.refresh() if s.state == "online"]
            missing = [s.layers for s in servers if s.layers not in canaries]
            if missing:
                canaries |= await trio.to_thread.run_sync(make_canaries, model, missing)
            for s in servers:
                host, port = parse_address(s.address)

                async def connect(host: str = host, port: int = port, s: ServerView = s) -> object:
                    return await pool.get(host, port, s.peer_id)

                result = await probe_safely(connect, canaries[s.layers], s.numerics, timeout)
                entry = health.setdefault(s.peer_id, ServerHealth(s.peer_id, s.layers))
                entry.add(result)
            round_no += 1
            console.print(f"round {round_no}: probed {len(servers)} servers")
            if rounds == 0 or round_no < rounds:
                await trio.sleep(interval)
    table = Table(title="canary results")
    for column in ("peer", "layers", "accuracy", "uptime", "median latency", "last"):
        table.add_column(column)
    for entry in sorted(health.values(), key=lambda e: (e.layers.start, str(e.peer_id))):
        style = "red" if entry.accuracy < 1.0 else "green"
        table.add_row(
            entry.peer_id.short(),
            str(entry.layers),
            f"[{style}]{entry.correct}/{entry.reachable} ({entry.accuracy:.0%})[/{style}]",
            f"{entry.reachable}/{entry.probes}",
            "-" if not entry.latencies else f"{entry.median_latency * 1e3:.1f} ms",
            entry.last_detail,
        )
    console.print(table)
