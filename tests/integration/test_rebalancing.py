"""Rebalancing with real servers on loopback: coverage heals itself, no block is left
uncovered by a move, and a generation running throughout gets the reference tokens."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import pytest
import trio

from swarm.client.config import ClientConfig, HedgeConfig
from swarm.client.model import AsyncRemoteModel
from swarm.dht import (
    DHTConfig,
    TimingConfig,
)
from swarm.directory import ServerView, block_keys, missing_ranges, servers_from_records
from swarm.lab.processes import ProcessGroup, swarm_command
from swarm.lab.reference import generate_locally
from swarm.server.balance import BalanceConfig
from swarm.server.config import ServerConfig
from swarm.server.rebalancer import RebalancerStatistics
from swarm.testing.checkpoints import make_tiny_checkpoint
from swarm.testing.swarm import LocalServer, LocalSwarm, open_local_swarm
from swarm.types import LayerRange, ServerState

PROMPT = [5, 17, 30, 99, 42, 7, 64, 3]
PERIOD = 1.0  # mean seconds between checks
L = LayerRange

pytestmark = pytest.mark.slow  # real servers (in this process, and in others at the end)


@pytest.fixture(scope="module")
def model4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model4") / "tiny4"
    return make_tiny_checkpoint(path, num_layers=4, hidden=64, vocab=128, seed=11, eos_token_id=127)


# Nodes ping contacts they have not heard from for this long (a bootstrap node that makes no
# lookups of its own otherwise hands out dead contacts for a minute, and every lookup that
# meets one waits out an RPC timeout; the default suits real swarms' minutes-long TTLs).
DHT = DHTConfig(timing=TimingConfig(contact_check_interval=2.0))


def base_config(model: Path) -> ServerConfig:
    balance = BalanceConfig(enabled=True, period=PERIOD, settle=2.0, drain_timeout=0.5)
    return ServerConfig(
        model=model, announce_ttl=6.0, measure_throughput=False, balance=balance, dht=DHT
    )


async def online_views(local: LocalSwarm, model_id: str) -> list[ServerView]:
    found = await local.dht.get_many(block_keys(model_id, 4))
    return servers_from_records(found, model_id, 4)


def coverage(local: LocalSwarm) -> list[int]:
    """Online servers per block, from the servers themselves (no DHT delay)."""
    counts = [0] * 4
    for s in local.servers:
        handlers = s.server.handlers
        if s.stopped.is_set() or handlers is None:
            continue
        if handlers.state.state == ServerState.ONLINE:
            for block in handlers.span.layers:
                counts[block] += 1
    return counts


def span_of(server: LocalServer) -> LayerRange | None:
    handlers = server.server.handlers
    return None if handlers is None else handlers.span.layers


async def wait_balanced(local: LocalSwarm) -> None:
    """Wait until every block has two online servers and every server has since checked
    and decided to stay (the caller's deadline bounds it)."""

    def stats() -> list[RebalancerStatistics]:
        return [s.server.rebalancer.statistics() for s in local.servers if s.server.rebalancer]

    while True:
        moves, before = moves_so_far(local), stats()
        while coverage(local) == [2, 2, 2, 2] and moves_so_far(local) == moves:
            now = stats()
            if all(
                a.checks > b.checks and a.last is not None and not a.last.move
                for a, b in zip(now, before, strict=True)
            ):
                return
            await trio.sleep(0.1)
        await trio.sleep(0.1)


def moves_so_far(local: LocalSwarm) -> int:
    return sum(
        s.server.rebalancer.statistics().moves
        for s in local.servers
        if s.server.rebalancer is not None
    )


async def watch_coverage(
    local: LocalSwarm,
    log: list[list[int]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    while True:
        log.append(coverage(local))
        await trio.sleep(0.02)


async def test_four_servers_on_one_half_spread_and_a_generation_runs_through(
    model4: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarm")
    want = generate_locally(model4, PROMPT, 48).ids
    seen: list[list[int]] = []
    with trio.fail_after(150):
        async with open_local_swarm(model4, config=base_config(model4), dht_config=DHT) as local:
            for _ in range(3):
                await local.add_server(L(0, 2))
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_coverage, local, seen)
                # blocks 2:4 get covered within a few periods (one of the three moves)
                while min(coverage(local)) == 0:
                    await trio.sleep(0.05)
                config = ClientConfig(
                    initial_peers=(local.dht_address,), hedging=HedgeConfig(after=None)
                )
                spanning, recoveries, generations = 0, 0, 0
                async with AsyncRemoteModel.open(model4, config) as model:
                    with trio.fail_after(90):
                        # the fourth server starts on 0:2 too, while generations run: a
                        # server of 0:2 then moves to 2:4 under them
                        nursery.start_soon(local.add_server, L(0, 2))
                        while coverage(local) != [2, 2, 2, 2] or generations < 2:
                            before = moves_so_far(local)
                            result = await model.generate_detailed(PROMPT, 48)
                            assert result.ids == want
                            generations += 1
                            spanning += moves_so_far(local) > before
                            recoveries += result.recoveries
                assert spanning >= 1, "no generation ran while a server moved"
                # ... and stay covered, with no further moves, over many periods
                moves = moves_so_far(local)
                await trio.sleep(10 * PERIOD)
                assert coverage(local) == [2, 2, 2, 2]
                again = moves_so_far(local)
                assert again == moves == 2
                views = await online_views(local, local.servers[0].ready.model_id)
                moved = [v for v in views if v.last_move is not None]
                assert len(moved) == 2
                assert all(v.last_move.to_range == L(2, 4) for v in moved)  # type: ignore[union-attr]
                nursery.cancel_scope.cancel()
    # blocks 0:2 were never without an online server (the first move covered 2:4 for good)
    first = next(i for i, c in enumerate(seen) if min(c) > 0)
    assert all(c[0] > 0 and c[1] > 0 for c in seen)
    assert all(min(c) > 0 for c in seen[first:])
    assert "banning" not in caplog.text
    print(f"generations spanning a move: {spanning}, recoveries: {recoveries}")


async def test_coverage_returns_after_the_only_servers_of_a_range_die(model4: Path) -> None:
    want = generate_locally(model4, PROMPT, 8).ids
    with trio.fail_after(150):
        async with open_local_swarm(model4, config=base_config(model4), dht_config=DHT) as local:
            for layers in (L(0, 2), L(0, 2), L(2, 4), L(2, 4)):
                await local.add_server(layers)
            # a server that checks before the others announced sees a gap and may move; the
            # bottleneck rule then spreads them again: wait for two balanced, quiet periods
            await wait_balanced(local)
            second_half = [i for i, s in enumerate(local.servers) if span_of(s) == L(2, 4)]
            for i in second_half:
                local.kill(i)  # crashed: their records stay until their TTL (6 s) runs out
            for i in second_half:
                await local.servers[i].stopped.wait()
            assert coverage(local) == [2, 2, 0, 0]
            logging.getLogger("swarm").warning("KILLED")
            moves = moves_so_far(local)
            # the dead records' TTL (6 s), then a few periods: the test's fail_after is the
            # deadline against a swarm that never heals; how fast it heals is internet.py's
            while min(coverage(local)) == 0:
                await trio.sleep(0.5)
            assert coverage(local) == [1, 1, 1, 1]
            assert moves_so_far(local) > moves  # healed by servers that moved
            config = ClientConfig(
                initial_peers=(local.dht_address,), hedging=HedgeConfig(after=None)
            )
            async with AsyncRemoteModel.open(model4, config) as model:
                # as `swarm generate --wait` does: the DHT's view may trail the servers by a
                # re-announcement (a record of a starved server expired for a moment at the
                # test's 6 s TTL: seen once in a full run, "no usable server covers block 0")
                while missing_ranges(await model.directory.servers(refresh=True), 4):
                    await trio.sleep(0.5)
                assert await model.generate(PROMPT, 8) == want


def test_processes_heal_and_a_waiting_client_then_succeeds(model4: Path) -> None:
    """Real `swarm` processes: the only server of 2:4 is SIGKILLed while two serve 0:2;
    `swarm generate --wait` started at once succeeds once one of them moved, and `swarm
    status` shows the move."""
    want = generate_locally(model4, PROMPT, 8).ids
    fast = ("--rebalance", "--balance-period", "1", "--announce-ttl", "6")
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        for i, layers in enumerate(["0:2", "0:2", "2:4"]):
            group.start_server(f"server{i}", str(model4), layers, dht, *fast)
        group.processes[-1].kill()  # the only server of 2:4 dies without a word
        ids = ",".join(map(str, PROMPT))
        argv = swarm_command(
            "generate", str(model4), "--ids", ids, "--initial-peers", dht,
            "--max-new-tokens", "8", "--json", "--wait", "120",
        )  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["ids"] == want
        # a status is one look at the DHT: with the test's 6 s TTL a starved server's late
        # re-announcement can leave its record expired for a moment (seen beside a CPU burner
        # at load ~8: the moved server missing from one look), so look until it shows or 60 s
        deadline = time.monotonic() + 60
        while True:
            status = subprocess.run(
                swarm_command("status", str(model4), "--initial-peers", dht),
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert status.returncode == 0, status.stderr
            if "moves (rebalancing)" in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(1)
        # the move's reason is "uncovered" once the dead record's TTL ran out, "bottleneck"
        # (the dead server counted at its announced speed) before
        assert "moves (rebalancing)" in status.stdout, status.stdout
        assert "uncovered" in status.stdout or "bottleneck" in status.stdout, status.stdout
        assert [proc.stop() for proc in group.processes[:3]] == [0, 0, 0]
