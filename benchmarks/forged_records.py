"""Forged announcements against the gateway (issue 25 item 8), figures for the note.

    cd /tmp && python /path/to/benchmarks/forged_records.py                    # this tree
    cd /tmp && PYTHONPATH=/tmp/gw-old python /path/to/benchmarks/forged_records.py  # another

(``/tmp/gw-old``: ``git archive 3cf7c1e swarm cli | tar -x -C /tmp/gw-old``; run from
outside the checkout so that ``swarm`` is imported from ``PYTHONPATH``; the script prints
which tree it imported.)

In one process: an honest server of swarm-demo (all 6 layers, `open_local_swarm`), a
"victim" (a TCP listener on loopback that counts the connections it accepts and closes
each), and a gateway (`Gateway` over an `AsyncRemoteModel` whose `Discovery` reads a fake
DHT). The DHT answers with the honest server's record and 21 forged ones, one per layer
range ``a:b`` of the 6 layers, each from a fresh identity naming the victim's address
(what any stranger may store: a record is only a claim). The fake DHT stands in for the
decoding (`servers_from_records` returns those views; both trees' strict decoder accepts
such values), everything else is each tree's own code: the gateway's refresh every
``refresh_s`` (5 s), its canary probes every ``--canary-interval`` (30 s, the CLI default)
and the discovery's pings.

``--forged 0`` leaves only the honest server: what the defence costs when nobody attacks.

Printed after ``--window`` seconds (45, as in the issue): the canary ranges the gateway
computed and the seconds that took, how many layer loads that took and the largest (a
range ``0:6`` loaded whole is the whole model in float32), and the connections the victim
accepted. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

import swarm
import swarm.api.gateway as gateway_module
import swarm.client.discovery as discovery_module
import swarm.verify.health as health
from swarm.api.config import GatewayConfig
from swarm.api.gateway import Gateway
from swarm.client.config import ClientConfig
from swarm.client.discovery import Discovery, StaticDirectory
from swarm.client.model import AsyncRemoteModel
from swarm.directory import ServerView
from swarm.identity import Identity
from swarm.shards import model_id
from swarm.shards.bundled import demo_model_path
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange, PeerId

LAYERS = 6


class FakeDHT:
    """Answers every lookup with nothing: the views come from the patched decoder."""

    async def get_many(self, keys: list[str]) -> dict[str, dict[PeerId, object]]:
        return {key: {} for key in keys}

    async def get(self, key: str) -> dict[PeerId, object]:
        return {}


async def run(window: float, canary_s: float, forged: int) -> dict[str, Any]:
    path = demo_model_path()
    computed: list[LayerRange] = []
    loads: list[int] = []
    real_make, real_load = gateway_module.make_canaries, health.load_span  # type: ignore[attr-defined]

    seconds: list[float] = []

    def counting_make(p: Path, ranges: list[LayerRange], **kw: Any) -> Any:
        computed.extend(sorted(set(ranges)))
        start = time.perf_counter()
        try:
            return real_make(p, ranges, **kw)
        finally:
            seconds.append(time.perf_counter() - start)

    def counting_load(p: Path, layers: LayerRange) -> Any:
        loads.append(len(layers))
        return real_load(p, layers)

    gateway_module.make_canaries = counting_make  # type: ignore[attr-defined,assignment]
    health.load_span = counting_load  # type: ignore[attr-defined,assignment]

    accepted = 0

    async def victim(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, victim, 0, host="127.0.0.1")
        )
        victim_port = listeners[0].socket.getsockname()[1]
        async with open_local_swarm(path, [LayerRange(0, LAYERS)]) as local:
            ready = local.servers[0].ready
            views = [ServerView(ready.peer_id, f"{ready.host}:{ready.port}",
                                LayerRange(0, LAYERS), 100.0, 8192)]  # fmt: skip
            ranges = list(itertools.combinations(range(LAYERS + 1), 2))[:forged]
            for a, b in ranges:
                forger = PeerId.from_public_key(Identity.generate().public_key)
                views.append(ServerView(forger, f"127.0.0.1:{victim_port}",
                                        LayerRange(a, b), 1e6, 1 << 20))  # fmt: skip
            discovery_module.servers_from_records = lambda *_: list(views)  # type: ignore[attr-defined,assignment]
            config = ClientConfig()
            async with AsyncRemoteModel.open(path, config, directory=StaticDirectory([])) as model:
                model.directory = Discovery(FakeDHT(), model.pool, model_id(path), LAYERS, config)  # type: ignore[arg-type]
                gateway = Gateway.create(model, GatewayConfig(), None)
                started = time.monotonic()
                with trio.move_on_after(window):
                    await gateway.run_background(canary_s)
                elapsed = time.monotonic() - started
        nursery.cancel_scope.cancel()
    return {
        "forged": len(views) - 1,
        "elapsed": elapsed,
        "computed": computed,
        "loads": loads,
        "seconds": sum(seconds),
        "accepted": accepted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=45.0, help="seconds to watch")
    parser.add_argument("--canary-interval", type=float, default=30.0)
    parser.add_argument(
        "--forged", type=int, default=21, help="forged records (0: the cost when nobody attacks)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    print(f"swarm imported from {Path(swarm.__file__).parent}", flush=True)
    r = trio.run(run, args.window, args.canary_interval, args.forged)
    ranges = " ".join(f"{x.start}:{x.stop}" for x in r["computed"]) or "-"
    print(f"forged records: {r['forged']} (one per layer range), watched {r['elapsed']:.1f} s")
    print(f"seconds computing canaries (in a worker thread): {r['seconds']:.2f}")
    print(f"canary ranges computed: {len(r['computed'])} ({ranges})")
    biggest = max(r["loads"], default=0)
    print(f"layer loads: {len(r['loads'])} calls, {sum(r['loads'])} layers, largest {biggest}")
    print(f"connections the victim accepted: {r['accepted']}")


if __name__ == "__main__":
    main()
