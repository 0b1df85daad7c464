"""A slow server and an idle replica: seconds per token, hedges and penalties under the hedge
deadline's old rule (a hop judged only against its own history) and the new one (also
against what the best other server for its layers should take by its record; issue 25
item 5).

    python benchmarks/hedging.py                      # both scenarios, both rules
    python benchmarks/hedging.py --tokens 4 --scenarios steady
    python benchmarks/hedging.py --prompt 8           # a longer prompt (see below)

An in-process swarm (`swarm.testing.swarm.open_local_swarm`: a DHT node and two real
servers on loopback, one torch thread each) serves a random 6-layer Llama (hidden 64) with
two servers of layers 0:6: the adversary ``slow:SECONDS[:FACTOR]`` of
`swarm.testing.adversaries` (honest answers, each computation delayed) and an honest
replica. A client (`AsyncRemoteModel`'s DHT view, pool and pings) opens a `Chain` over
0:6 and steps it: a ``--prompt``-token prompt (1), then ``--tokens`` single tokens (8). The
replica starts with a routing penalty of 10 (as if it had lost races before) so that both
rules start on the slow server whatever the two servers measured at start-up; the chain
may move to the replica only by hedging (a replacement avoids the raced server).

The adversary delays each computation, not each token, so a prompt of n tokens makes the
slow server look n times faster per token than its decode steps: the old rule then races
the first decode step too (its yardstick is the prompt's time per token). A 1-token prompt
leaves the old rule only the slow server's own decode times, as in the issue's figures.

Scenarios: ``steady`` (the slow server takes 5 s for every computation) and ``slowing``
(0.2 s at first, 1.6x longer each time). The old rule is the new code with the
alternative set to None (`OwnHistoryChain`), everything else equal (`ClientConfig`'s
defaults: hedge after 3x, floor 0.5 s, step timeout 30 s).

Two more scenarios measure what hedging costs where the first server is not steadily slow
(``--scenarios honest hiccup --tokens 300``): ``honest`` (two honest replicas, neither
penalised: the hedge rate when nobody is slow) and ``hiccup`` (``slow-every:16:SECONDS``,
``--hiccup`` seconds, 1.5: a server that waits before one computation in 16 and is
otherwise as fast as the replica). In these two the old rule is 3cf7c1e's whole rule:
besides the yardstick, an original that answers first after being raced costs it
nothing (`OwnHistoryChain`'s policy); the new code penalises it (a hedge was spent on it).

Printed per run: seconds per token (the decode steps' mean, and the last one), the
prompt's seconds, hedges (won by the replica / lost to the original), hedges per 100
tokens, the first server's penalty at the end, and whether the route ended on the other
server. Real seconds: a loaded machine stretches them, not the hedge counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.bans import BanList
from swarm.client.chain import Chain
from swarm.client.chain.failures import FailurePolicy
from swarm.client.chain.hedging import HedgeWinner
from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.checkpoints import write_random_llama
from swarm.server.config import ServerConfig
from swarm.testing.adversaries import adversary_wrapper
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange, PeerId

LAYERS = 6
SCENARIOS: dict[str, str | None] = {
    "steady": "slow:5",
    "slowing": "slow:0.2:1.6",
    "honest": None,
    "hiccup": "slow-every:16:{hiccup}",
}


class OldPolicy(FailurePolicy):
    """3cf7c1e's penalty rule: only a hop that lost its race to the replacement is
    penalised; one that answered first after being raced costs nothing."""

    def __init__(self, chain: Chain, config: ClientConfig, bans: BanList) -> None:
        super().__init__(config, bans)
        self.chain = chain

    def slow(self, peer: PeerId) -> None:
        # the race's record is appended before it settles: it names the winner
        last = self.chain.hedges[-1] if self.chain.hedges else None
        if last is not None and last.slow == peer and last.winner is HedgeWinner.ORIGINAL:
            return
        super().slow(peer)


class OwnHistoryChain(Chain):
    """The old rule: a hop is judged only against its own recent step times."""

    async def alternative(self, k: int, tokens: int) -> float | None:
        return None


class OldChain(OwnHistoryChain):
    """3cf7c1e's whole rule: its yardstick (`OwnHistoryChain`) and its penalties
    (`OldPolicy`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = OldPolicy(self, self.config, self.policy.bans)
        self.opener.failures = self.policy


@dataclasses.dataclass(frozen=True)
class Run:
    scenario: str
    rule: str
    per_token: float
    last_token: float
    prompt: float
    hedges: int
    won_by_replacement: int
    lost_to_original: int
    penalty: float
    moved: bool
    hedged_steps: tuple[str, ...]  # step and winner (o: the original, r: the replacement)


async def run(
    path: Path, scenario: str, rule: str, prompt: int, tokens: int, hiccup: float, hidden: int
) -> Run:
    torch.manual_seed(0)
    base = ServerConfig(model=path, announce_ttl=30.0)
    spec = SCENARIOS[scenario]
    async with open_local_swarm(path, [], config=base) as local:
        wrap = None if spec is None else adversary_wrapper(spec.format(hiccup=hiccup))
        slow = await local.add_server(LayerRange(0, LAYERS), wrap_handlers=wrap)
        replica = await local.add_server(LayerRange(0, LAYERS))
        config = local.client_config()
        slow_peer, replica_peer = slow.ready.peer_id, replica.ready.peer_id
        async with AsyncRemoteModel.open(path, config) as model:
            bans = BanList(
                config.failures.ban_base_s, config.failures.ban_backoff, config.failures.ban_max_s
            )
            if spec is not None:  # the route starts on `slow`
                bans.penalties.penalise(replica_peer, 10.0, 3600.0)
            old: type[Chain] = OldChain if scenario in ("honest", "hiccup") else OwnHistoryChain
            kind = old if rule == "old" else Chain
            times: list[float] = []
            with trio.fail_after(30 + 60 * (tokens + 1)):
                async with kind.open(
                    model.pool,
                    model.directory,
                    config,
                    layers=LayerRange(0, LAYERS),
                    max_length=prompt + tokens + 1,
                    bans=bans,
                    rng=random.Random(0),
                ) as chain:
                    first = chain.route[0].server.peer_id
                    assert spec is None or first == slow_peer
                    position = 0
                    for n in [prompt] + [1] * tokens:
                        x = torch.randn(1, n, hidden)  # (batch, n, hidden)
                        positions = torch.arange(position, position + n).unsqueeze(0)
                        start = time.perf_counter()
                        await chain.step(x, positions)
                        times.append(time.perf_counter() - start)
                        position += n
                    stats = chain.statistics()
                    moved = chain.route[0].server.peer_id != first
    decode = times[1:]
    won = sum(1 for h in stats.hedges if h.winner is HedgeWinner.REPLACEMENT)
    lost = sum(1 for h in stats.hedges if h.winner is HedgeWinner.ORIGINAL)
    return Run(
        scenario,
        rule,
        statistics.mean(decode),
        decode[-1],
        times[0],
        len(stats.hedges),
        won,
        lost,
        bans.penalties.penalty(first),
        moved,
        tuple(f"{h.step}{h.winner.value[0]}" for h in stats.hedges),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1, help="tokens of the first step")
    parser.add_argument("--tokens", type=int, default=8, help="decode steps after the prompt")
    parser.add_argument("--steps", action="store_true", help="list the hedged steps")
    parser.add_argument("--hidden", type=int, default=64, help="the model's hidden size")
    parser.add_argument("--scenarios", nargs="+", default=["steady", "slowing"], choices=SCENARIOS)
    parser.add_argument(
        "--hiccup", type=float, default=0.7, help="seconds of the hiccup scenario's delay"
    )
    parser.add_argument("--rules", nargs="+", default=["old", "new"], choices=["old", "new"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_llama(Path(tmp) / "tiny", num_layers=LAYERS, hidden=args.hidden)
        print(
            f"{'scenario':<9} {'rule':<4} {'s/token':>8} {'last':>7} {'prompt':>7} "
            f"{'hedges':>6} {'won':>4} {'lost':>4} {'/100tok':>7} {'penalty':>7} {'moved':>5}"
        )
        for scenario in args.scenarios:
            for rule in args.rules:
                r = trio.run(
                    run, path, scenario, rule, args.prompt, args.tokens, args.hiccup, args.hidden
                )
                rate = 100 * r.hedges / args.tokens
                print(
                    f"{r.scenario:<9} {r.rule:<4} {r.per_token:>8.2f} {r.last_token:>7.2f} "
                    f"{r.prompt:>7.2f} {r.hedges:>6} {r.won_by_replacement:>4} "
                    f"{r.lost_to_original:>4} {rate:>7.2f} "
                    f"{r.penalty:>7.2f} {'yes' if r.moved else 'no':>5}",
                    flush=True,
                )
                if args.steps:
                    print(f"  hedged steps: {' '.join(r.hedged_steps) or '-'}", flush=True)


if __name__ == "__main__":
    main()
