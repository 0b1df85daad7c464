"""Verification: what each policy costs, and how fast it catches each kind of liar (issue 6).

    python benchmarks/verify.py                  # everything below
    python benchmarks/verify.py --only cost      # one part: cost, detection, colluders
    python benchmarks/verify.py --economics      # only the stake arithmetic

1. cost (end to end): an in-process swarm of a tiny model (hidden 256, 8 layers, vocab 32000)
   with three honest float32 servers each serving all 8 layers; a client generates 32 greedy
   tokens after a 16-token prompt under each policy (a warm-up generation first, so peers are
   no longer "new"), 3 rounds over the policies in turn, medians. Extra compute = the
   servers' compute-worker busy seconds during the generation over ``none``'s (inflated when
   replicas compute at the same time on a 2-core machine); latency = median per-token seconds
   of the decoded tokens (accepted steps) over ``none``'s; "final" = until ``generate``
   returned (optimistic includes its challenge).
2. detection (simulated): 100 seeded trials per (policy, liar kind) through the real
   `Verifier`, answers from real recorded outputs of a 4-layer model (float32 checkers, one
   bfloat16), 30 steps: detection probability within 30 steps and median steps to detection.
3. colluders (simulated): replicas of one hop, of which 1/3 or 1/2 collude (same wrong answer,
   ``collude:SEED``); the checked peer is always a colluder.
4. economics: for a stake S, a gain g per cheated step and a base audit rate p, the effective
   audit rate after trust (stake, clean history) and whether cheating pays
   (p_eff x S < g: the expected slash per cheated step is smaller than the gain).

Figures go in benchmarks/README.md. Not a test: nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel
from swarm.net.methods import HandlerRegistry
from swarm.server.handlers import ServingHandlers
from swarm.shards import load_head, load_span
from swarm.testing.adversaries import corruptor, perturb_weights
from swarm.testing.checkpoints import make_tiny_checkpoint, write_random_llama
from swarm.testing.simulate import Recording, SimPeer, record_outputs, simulate_hop
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange
from swarm.verify.policy import parse_policy
from swarm.verify.reputation import PeerRecord
from swarm.verify.suspicion import audit_rate

PROMPT = list(range(100, 116))  # 16 tokens
NEW_TOKENS = 32
POLICIES = ["none", "spot-check:0.1", "spot-check:0.2", "redundant:3", "optimistic"]
KINDS = ["noise:0.01", "skip", "zeros", "other-weights", "cheat:0.1", "after:10"]
STEPS = 30
TRIALS = 100
LAST_FRAMED = 0  # trials of the last `detect` in which an honest peer was outvoted


# ---- 1. cost and latency, end to end ----


def busy(handlers: list[ServingHandlers]) -> float:
    """Seconds the servers' compute workers spent computing (benchmark-only peek)."""
    return sum(h.queue._busy_seconds for h in handlers)


async def cost(path: Path, rounds: int = 3) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in POLICIES}
    handlers: list[ServingHandlers] = []

    def keep(h: ServingHandlers) -> HandlerRegistry:
        handlers.append(h)
        return h.registry()

    async with open_local_swarm(path) as local:
        for _ in range(3):
            await local.add_server(LayerRange(0, 8), wrap_handlers=keep)
        models = {}
        async with AsyncExitStack() as stack:
            for policy in POLICIES:
                config = ClientConfig(
                    initial_peers=(local.dht_address,),
                    verify=policy,
                    records=RecordsConfig(seed=1, reputation_path=None),
                )
                model = await stack.enter_async_context(AsyncRemoteModel.open(path, config))
                await model.generate(PROMPT, NEW_TOKENS)  # warm-up; peers pass first audits
                models[policy] = model
            for _ in range(rounds):
                for policy, model in models.items():
                    b0, t0 = busy(handlers), trio.current_time()
                    result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                    row = samples[policy]
                    row.setdefault("final_s", []).append(trio.current_time() - t0)
                    row.setdefault("busy_s", []).append(busy(handlers) - b0)
                    row.setdefault("token_s", []).append(statistics.median(result.timings[1:]))
    rows = {p: {k: statistics.median(v) for k, v in row.items()} for p, row in samples.items()}
    for row in rows.values():
        row["compute"] = row["busy_s"] / rows["none"]["busy_s"]
    base = rows["none"]
    for row in rows.values():
        row["latency"] = row["token_s"] / base["token_s"]
        row["final"] = row["final_s"] / base["final_s"]
    print(
        f"{'policy':16} {'compute x none':>15} {'token latency x':>16} {'ms/token':>9} "
        f"{'time to final x':>16}"
    )
    for name, row in rows.items():
        print(
            f"{name:16} {row['compute']:15.2f} {row['latency']:16.2f} "
            f"{row['token_s'] * 1e3:9.2f} {row['final']:16.2f}"
        )
    return rows


# ---- 2. and 3. detection, simulated over recorded outputs ----


def recordings(path: Path) -> tuple[torch.Tensor, dict[str, Recording]]:
    layers = LayerRange(0, 4)
    ids = torch.randint(0, 128, (1, 8 + STEPS - 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = load_head(path).embed(ids).float()  # (1, seq, hidden)
    chunks = [8] + [1] * (STEPS - 1)
    other = load_span(path, layers)
    perturb_weights(other, seed=7)
    return x, {
        "float32": record_outputs(load_span(path, layers), x, chunks),
        "bfloat16": record_outputs(load_span(path, layers, dtype=torch.bfloat16), x, chunks),
        "other": record_outputs(other, x, chunks),
    }


async def detect(
    x: torch.Tensor, recs: dict[str, Recording], policy: str, liar_of: object, checkers: object
) -> tuple[float, float | None]:
    global LAST_FRAMED
    steps, LAST_FRAMED = [], 0
    for trial in range(TRIALS):
        liar = liar_of(trial)  # type: ignore[operator]
        result = await simulate_hop(x, liar, checkers(trial), parse_policy(policy), seed=trial)  # type: ignore[operator]
        if result.detected_at is not None:
            steps.append(result.detected_at + 1)
        LAST_FRAMED += result.flagged_honest > 0
    median = statistics.median(steps) if steps else None
    return len(steps) / TRIALS, median


def liar_factory(kind: str, recs: dict[str, Recording]) -> object:
    def make(trial: int) -> SimPeer:
        if kind == "other-weights":
            return SimPeer.make("liar", recs["other"], liar=True)
        return SimPeer.make("liar", recs["float32"], corruptor(kind, seed=trial))

    return make


async def detection(
    x: torch.Tensor, recs: dict[str, Recording]
) -> dict[tuple[str, str], tuple[float, float | None]]:
    honest = [
        SimPeer.make("a", recs["float32"]),
        SimPeer.make("b", recs["float32"]),
        SimPeer.make("c", recs["bfloat16"]),
    ]
    out = {}
    print(f"{'policy':16} " + " ".join(f"{k:>16}" for k in KINDS))
    print(f"{'':16} " + " ".join(f"{'P(det) median':>16}" for _ in KINDS))
    for policy in POLICIES[1:]:
        cells = []
        for kind in KINDS:
            p, med = await detect(x, recs, policy, liar_factory(kind, recs), lambda t: honest)
            out[(policy, kind)] = (p, med)
            cells.append(f"{p:6.2f} {('-' if med is None else f'{med:g}'):>9}")
        print(f"{policy:16} " + " ".join(f"{c:>16}" for c in cells))
    return out


async def colluders(
    x: torch.Tensor, recs: dict[str, Recording]
) -> dict[tuple[str, str], tuple[float, float | None]]:
    """Six replicas of the hop; 2 (1/3) or 3 (1/2) of them collude, the checked one included."""
    out = {}
    print(f"{'policy':16} {'1/3 colluding':>22} {'1/2 colluding':>22}")
    print(f"{'':16} " + " ".join(f"{'P(det) median framed':>22}" for _ in range(2)))
    for policy in ("spot-check:0.2", "redundant:3", "optimistic"):
        cells = []
        for share, count in (("1/3", 2), ("1/2", 3)):

            def liar(trial: int) -> SimPeer:
                return SimPeer.make("colluder0", recs["float32"], corruptor("collude:5"))

            def checkers(trial: int, count: int = count) -> list[SimPeer]:
                friends = [
                    SimPeer.make(f"colluder{i}", recs["float32"], corruptor("collude:5"))
                    for i in range(1, count)
                ]
                fair = [SimPeer.make(f"honest{i}", recs["float32"]) for i in range(6 - count)]
                return friends + fair

            p, med = await detect(x, recs, policy, liar, checkers)
            out[(policy, share)] = (p, med)
            framed = LAST_FRAMED / TRIALS
            cells.append(f"{p:6.2f} {('-' if med is None else f'{med:g}'):>6} {framed:8.2f}")
        print(f"{policy:16} " + " ".join(f"{c:>22}" for c in cells))
    return out


# ---- 4. economics ----


def economics(stakes: list[float], gain: float, rate: float, clean: int) -> None:
    print(
        f"base audit rate p={rate:g}, gain per cheated step g={gain:g}, "
        f"clean audits so far={clean}; a proven lie slashes the whole stake"
    )
    print(
        f"{'stake S':>10} {'p_eff':>8} {'E[slash]/step':>14} {'cheating pays?':>15} "
        f"{'break-even S':>13}"
    )
    record = PeerRecord(passed=clean)
    for stake in stakes:
        p_eff = audit_rate(rate, record, stake=stake)
        expected = p_eff * stake
        pays = "yes" if expected < gain else "no"
        # smallest S with audit_rate(S) * S >= g (p_eff is floored at p/4, so it exists)
        lo, hi = 0.0, max(gain / (rate * 0.25), 1.0)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if audit_rate(rate, record, stake=mid) * mid < gain else (lo, mid)
        print(f"{stake:10g} {p_eff:8.4f} {expected:14.4g} {pays:>15} {hi:13.4g}")


def table(
    rows: dict[str, dict[str, float]], det: dict[tuple[str, str], tuple[float, float | None]]
) -> None:
    def worst(policy: str) -> str:
        ps = [det[(policy, k)][0] for k in KINDS]
        meds = [det[(policy, k)][1] for k in KINDS if det[(policy, k)][1] is not None]
        worst_median = max(m for m in meds if m is not None)
        return (
            f"P(detect in {STEPS} steps) {min(ps):.2f}-{max(ps):.2f}, "
            f"median {worst_median:g} steps (worst kind)"
        )

    opt, spot = rows["optimistic"], rows["spot-check:0.1"]
    print("| method | cost | latency | security |")
    print("| --- | --- | --- | --- |")
    print(
        "| zero-knowledge (not implemented) | 10^5-10^6 x a forward (ezkl, ANCHORS) | "
        "~17 s per layer of hidden 16 (ANCHORS) | highest: a proof |"
    )
    print(
        f"| optimistic | {opt['compute']:.2f} x none | {opt['latency']:.2f} x per accepted "
        f"token, {opt['final']:.2f} x to final | conditional on a challenger: "
        f"{worst('optimistic')} |"
    )
    print(
        f"| cryptoeconomic (spot-check:0.1 + stake) | {spot['compute']:.2f} x none | "
        f"{spot['latency']:.2f} x | probabilistic: {worst('spot-check:0.1')} |"
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows: dict[str, dict[str, float]] = {}
        det: dict[tuple[str, str], tuple[float, float | None]] = {}
        if args.only in (None, "cost"):
            path = Path(tmp) / "tiny"
            write_random_llama(
                path,
                num_layers=8,
                hidden=256,
                heads=8,
                kv_heads=8,
                intermediate=688,
                vocab=32000,
                seed=0,
            )
            print("== cost and latency (end to end, 3 honest float32 servers) ==")
            rows = await cost(path)
        if args.only in (None, "detection", "colluders"):
            small = make_tiny_checkpoint(Path(tmp) / "small", num_layers=4, seed=5)
            x, recs = recordings(small)
            if args.only in (None, "detection"):
                print(f"\n== detection within {STEPS} steps, {TRIALS} trials (simulated) ==")
                det = await detection(x, recs)
            if args.only in (None, "colluders"):
                print(f"\n== colluders among 6 replicas, {TRIALS} trials (simulated) ==")
                await colluders(x, recs)
        if rows and det:
            print("\n== the issue's table, measured ==")
            table(rows, det)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["cost", "detection", "colluders"])
    parser.add_argument("--economics", action="store_true")
    parser.add_argument("--stakes", type=float, nargs="*", default=[0, 10, 100, 1000, 10000])
    parser.add_argument("--gain", type=float, default=1.0, help="gain per cheated step")
    parser.add_argument("--rate", type=float, default=0.1, help="base audit rate p")
    parser.add_argument("--clean", type=int, default=100, help="clean audits of the peer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("swarm").setLevel(logging.ERROR)  # detections are expected here
    if args.economics:
        economics(args.stakes, args.gain, args.rate, args.clean)
        return
    trio.run(main_async, args)
    print()
    economics(args.stakes, args.gain, args.rate, args.clean)


if __name__ == "__main__":
    main()
