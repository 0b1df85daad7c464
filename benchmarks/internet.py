"""An internet-sized swarm in one or a few processes: DHT lookups, routes, coverage under churn.

    python benchmarks/internet.py                       # the small run (60 nodes, 12 servers)
    python benchmarks/internet.py --dht-nodes 1000 --servers 100 --blocks 32 --span 4 \\
        --clients 20 --sybil-share 0.1 --junk-sybils 0.5 --churn-per-minute 0.5 \\
        --duration 100 --period 10 --ttl 20 --mass-leave-at 40 --mass-leave-gap --processes 2

The last is issue 23's target at compressed timings (every server reads every block key
each 10 s): it starves a 2-core machine. At the product's own timings (balance period
120 s, TTL 60 s) the same target fits in about 1.6 cores:

    python benchmarks/internet.py --dht-nodes 1000 --servers 100 --blocks 32 --span 4 \\
        --clients 20 --sybil-share 0.1 --junk-sybils 0.5 --churn-per-minute 0.5 \\
        --duration 480 --period 120 --ttl 60 --mass-leave-at 120 --mass-leave-gap \\
        --processes 3

``--processes N`` splits the DHT nodes over N processes, and the servers', clients' and
probes' DHT operations with them (`swarm.testing.internet_workers`,
`swarm.testing.internet_ops`).

The DHT plane is real (datagrams through emulated links: 3 regions, one-way delays 5-15 ms
inside, 40-120 ms across, loss), the compute plane is modelled; see
`swarm.testing.internet` for what is real and what is not. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import trio

from swarm.testing.internet import SimConfig, run_simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SimConfig()
    for name in (
        "dht_nodes", "servers", "blocks", "span", "clients", "tokens", "seed", "processes",
        "verified_cache",
    ):  # fmt: skip
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=int, default=getattr(defaults, name))
    for name in (
        "loss", "sybil_share", "junk_sybils", "duration", "period", "ttl", "churn_per_minute",
        "mass_leave_at", "mass_leave_share", "load_seconds", "client_wait", "heal_grace",
        "slow_share", "slow_delivers", "relayed_share", "relayed_delivers", "watch",
        "ping_timeout",
    ):  # fmt: skip
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name)
        )
    parser.add_argument("--mass-leave-gap", action="store_true")
    parser.add_argument(
        "--no-probes", dest="probes", action="store_false",
        help="servers announce no measure of what their next servers delivered",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(message)s")
    logging.getLogger("swarm.testing.internet").setLevel(logging.INFO)
    config = SimConfig(**{k: v for k, v in vars(args).items()})
    started = time.monotonic()
    report = trio.run(run_simulation, config)
    out = {"config": vars(args), **report.summary(), "wall_seconds": time.monotonic() - started}
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
