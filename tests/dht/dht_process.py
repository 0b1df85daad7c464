"""Helper process for test_processes: 10 DHT nodes that announce, print READY, wait for SIGTERM.

Usage: python dht_process.py INDEX [INITIAL_PEER]
"""

from __future__ import annotations

import signal
import sys

import trio

from swarm.dht import (
    DHTConfig,
    TimingConfig,
)
from swarm.testing.dht import open_dht_cluster


async def main(index: int, initial: str) -> None:
    config = DHTConfig(timing=TimingConfig(rpc_timeout=2.0, bootstrap_timeout=10))
    peers = (initial,) if initial else ()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_dht_cluster(10, config, seed=f"proc{index}", initial_peers=peers) as c:
            for node in c.nodes:
                for key in [f"proc/block/{i}" for i in range(3)]:
                    await node.announce(key, {"proc": index}, 60.0)
            print(f"READY {c.nodes[0].address}", flush=True)
            async for _ in signals:
                break


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
