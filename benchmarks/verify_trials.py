"""End-to-end seeded trials of `spot-check:0.2` against each kind of always-lying peer.

    python benchmarks/verify_trials.py --trials 100

The test suite checks the 100-trial statistics by replaying the real `Verifier` over recorded
outputs (fast) and runs one end-to-end generation per liar kind; this script runs the whole
thing end to end, `--trials` times per kind: an in-process swarm of a 4-layer random Llama
(one liar whose measured throughput makes routes prefer it, two honest replicas), 30 greedy
tokens, a fresh client (reputation file) per trial, seeds 0..trials-1 for the verifier.
A trial passes when the liar is detected and banned within 30 steps, is off the final route,
and the generated ids equal the single-process reference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.reference import generate_locally
from swarm.testing.adversaries import adversary_wrapper
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

PROMPT = [5, 17, 30, 99, 42, 7, 64, 3]
NEW_TOKENS = 30
KINDS = ["noise:0.01", "skip", "zeros", "other-weights:7"]


async def trial(model: Path, spec: str, seed: int, tmp: Path, reference: list[int]) -> bool:
    async with open_local_swarm(model) as local:
        liar = await local.add_server(LayerRange(0, 4), wrap_handlers=adversary_wrapper(spec))
        for _ in range(2):
            await local.add_server(LayerRange(0, 4), measure_throughput=False)
        config = ClientConfig(
            initial_peers=(local.dht_address,),
            verify="spot-check:0.2",
            records=RecordsConfig(seed=seed, reputation_path=str(tmp / f"rep-{spec}-{seed}.json")),
        )
        async with AsyncRemoteModel.open(model, config) as remote:
            result = await remote.generate_detailed(PROMPT, NEW_TOKENS)
            ids, verifier = result.ids, remote.verifier
            assert verifier is not None
            peer = liar.server.identity.peer_id
            caught = [step for who, step in verifier.detections if who == peer]
            return (
                bool(caught)
                and caught[0] < 30
                and verifier.reputation.is_banned(peer)
                and all(hop["peer"] != str(peer) for hop in result.route)
                and ids == reference
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = write_random_llama(
            tmp / "tiny4", num_layers=4, hidden=64, vocab=128, seed=5, std=0.1
        )
        reference = generate_locally(model, PROMPT, NEW_TOKENS).ids
        if 2 in reference:  # the client stops at EOS (id 2 in this checkpoint), keeping it
            reference = reference[: reference.index(2) + 1]
        for spec in KINDS:
            started, passed = time.perf_counter(), 0
            for seed in range(args.trials):
                passed += trio.run(trial, model, spec, seed, tmp, reference)
            print(
                f"spot-check:0.2 vs {spec:16s} passed {passed}/{args.trials} end-to-end trials "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
