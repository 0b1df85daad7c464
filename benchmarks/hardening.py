"""Issue 25 items 6, 11, 12: figures of the attacks and of what the defences cost when nobody
attacks, on loopback, in one process. Runs against whatever ``swarm`` is importable, so the
same script measures a checkout from before the defences (``PYTHONPATH=<checkout>``).

    python benchmarks/hardening.py [--forwards 100]

- reflection: bytes of the reply a stranger's find_value / find_node draws from a node
  holding a full key (40 records), against the request's bytes;
- proof starvation: 300 forged records (each a fresh identity naming a silent listener) from
  one source group reach a storing node (proof timeout 0.5 s, 4 at once, 50/s); then one
  honest newcomer's record: seconds until its claim is proven (60 s cap);
- empty forward: seconds until a forward of 0 tokens is answered (5 s cap), and the compute
  queue 1 s after 64 such calls from 4 identities were given up;
- per-request cost: median round trip of 1x8-token forwards to an idle server.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import statistics
import tempfile
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
import trio

from swarm.dht import (
    AdmissionConfig,
    DHTConfig,
    DHTNode,
    ProofConfig,
    Record,
)
from swarm.dht.proofs import ProofCache, run_proofs
from swarm.dht.protocol import key_digest
from swarm.dht.records import make_record
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage
from swarm.dht.wire import encode_request
from swarm.identity import Identity
from swarm.net.messages import ForwardRequest, ForwardResponse
from swarm.net.pool import open_connection_pool
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

KEY = "bench-hardening/block/0"


async def reflection() -> None:
    async with DHTNode.open(Identity.from_seed(b"store"), DHTConfig()) as node:

        def fill(kad: Any) -> None:
            for i in range(40):
                writer = Identity.from_seed(f"writer{i}".encode())
                value = {"addr": "10.0.0.1:1", "pad": "x" * 120}
                record = make_record(writer, KEY, value, time.time() + 300, 1, 1200)
                kad.storage.merge(key_digest(KEY), [record.encoded], source=f"g{i}")

        await node.run_on_loop(fill)
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            for name, args in (
                ("find_value", (os.urandom(20), key_digest(KEY))),
                ("find_node", (os.urandom(20), os.urandom(20))),
            ):
                request = encode_request(os.urandom(20), name, args, client_only=True, token=None)
                await sock.sendto(request, ("127.0.0.1", node.port))
                got = 0
                with trio.move_on_after(0.5):
                    while True:
                        got += len(await sock.recv(65536))
                print(
                    f"reflection {name}: request {len(request)} B, reply {got} B, "
                    f"x{got / len(request):.1f}"
                )


class _Silent:
    def __init__(self, honest: Any) -> None:
        self.honest = honest

    def claim(self, record: Record) -> Hashable | None:
        addr = record.value.get("addr") if record.value else None
        return (record.peer_id, addr) if isinstance(addr, str) else None

    async def prove(self, claim: Hashable) -> bool:
        if isinstance(claim, tuple) and claim[0] == self.honest:
            return True
        await trio.sleep_forever()
        return False


async def proof_starvation() -> None:
    config = DHTConfig(
        proofs=ProofConfig(timeout=0.5, concurrency=4, rate=50.0),
        admission=AdmissionConfig(store_burst=10_000),
    )
    newcomer = Identity.from_seed(b"newcomer")
    prover = _Silent(newcomer.peer_id)
    stats = StatsCounter()
    cache = ProofCache(prover, config, stats)
    store = RecordStorage(config, stats, cache)
    fair = len(inspect.signature(run_proofs).parameters) > 4  # after issue 25: (claim, group)
    send, receive = trio.open_memory_channel[Any](256 if not fair else 100_000)

    def submit(claim: Hashable, group: str = "") -> None:
        try:
            send.send_nowait((claim, group) if fair else claim)
        except trio.WouldBlock:
            pass  # before: a full channel dropped it

    cache.submit = submit  # type: ignore[assignment]

    async def settle(claim: Hashable, ok: bool) -> None:
        store.settle(claim, ok)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_proofs, prover, config, receive, settle)
        for i in range(300):
            sybil = Identity.from_seed(f"forged-{i}".encode())
            key = f"bench-hardening/block/{i % 6}"
            record = make_record(
                sybil, key, {"addr": f"6.6.6.{i % 250}:{i}"}, time.time() + 60, 1, 1200
            )
            store.merge(hashlib.sha1(key.encode()).digest(), [record.encoded], "attacker")
        await trio.sleep(0.1)
        started = trio.current_time()
        blob = make_record(newcomer, KEY, {"addr": "1.2.3.4:5"}, time.time() + 60, 1, 1200)
        store.merge(key_digest(KEY), [blob.encoded], "newcomer")
        claim = (newcomer.peer_id, "1.2.3.4:5")
        proven = False
        with trio.move_on_after(60):
            while not proven:
                args = (claim, "newcomer") if fair else (claim,)
                proven = cache.proven(*args)  # type: ignore[arg-type]
                await trio.sleep(0.05)
        waited = trio.current_time() - started
        nursery.cancel_scope.cancel()
    print(f"proof starvation: newcomer proven={proven} after {waited:.1f} s (cap 60 s)")


async def server_figures(forwards: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny"
        write_random_llama(path, num_layers=2, hidden=64, seed=7, std=0.1)
        async with open_local_swarm(path) as local:
            server = await local.add_server(LayerRange(0, 2), measure_throughput=False)
            handlers = server.server.handlers
            assert handlers is not None
            ready = server.ready
            async with open_connection_pool(Identity.generate()) as pool:
                conn = await pool.get(ready.host, ready.port, ready.peer_id)

                def request(seq: int) -> ForwardRequest:
                    hidden = torch.randn(1, seq, 64)
                    positions = torch.arange(seq, dtype=torch.int64).unsqueeze(0)
                    return ForwardRequest(hidden, positions, LayerRange(0, 2))

                rtts = []
                for _ in range(forwards):
                    started = time.perf_counter()
                    await conn.call("forward", request(8), ForwardResponse, timeout=30)
                    rtts.append(time.perf_counter() - started)
                print(
                    f"per-request: median 1x8 forward {statistics.median(rtts) * 1e3:.2f} ms "
                    f"over {forwards} (p90 {sorted(rtts)[int(0.9 * forwards)] * 1e3:.2f} ms)"
                )
                started = time.perf_counter()
                answer = "no answer"
                with trio.move_on_after(5):
                    try:
                        await conn.call("forward", request(0), ForwardResponse, timeout=10)
                        answer = "answered"
                    except Exception as exc:  # what the server said
                        answer = type(exc).__name__
                print(f"empty forward: {answer} after {time.perf_counter() - started:.2f} s")
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    async with open_connection_pool(Identity.generate()) as pool:
                        conn = await pool.get(ready.host, ready.port, ready.peer_id)
                        for _ in range(16):
                            with trio.move_on_after(0.05):
                                try:
                                    await conn.call("forward", request(0), ForwardResponse)
                                except Exception:
                                    pass
                nursery.cancel_scope.cancel()
            await trio.sleep(1.0)
            print(f"empty forwards: {handlers.queue.statistics().queued} jobs queued 1 s later")


async def main(forwards: int) -> None:
    await reflection()
    await proof_starvation()
    await server_figures(forwards)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--forwards", type=int, default=100)
    trio.run(main, parser.parse_args().forwards)
