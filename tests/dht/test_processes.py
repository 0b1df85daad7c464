"""Real processes: the `swarm dht` command, and 3 processes of 10 DHT nodes each."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from swarm.dht import (
    DHTConfig,
    DHTNode,
    TimingConfig,
)
from swarm.identity import Identity
from swarm.net.swarm_key import create_swarm_key

pytestmark = pytest.mark.slow

NODE_SCRIPT = Path(__file__).with_name("dht_process.py")


async def _read_line(proc: trio.Process, deadline_s: float) -> str:
    """First stdout line of ``proc`` (fails after ``deadline_s``)."""
    assert proc.stdout is not None
    data = b""
    with trio.fail_after(deadline_s):
        while b"\n" not in data:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"process exited before printing a line: {data!r}")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


async def _stop(proc: trio.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(10):
        return await proc.wait()
    proc.kill()
    await proc.wait()
    raise AssertionError("process ignored SIGTERM")


async def test_swarm_dht_command_serves_until_sigterm(tmp_path: Path) -> None:
    create_swarm_key(tmp_path / "swarm.key")
    cmd = [sys.executable, "-m", "swarm_cli.main", "dht", "--port", "0"]
    cmd += ["--identity", str(tmp_path / "id.key"), "--swarm-key", str(tmp_path / "swarm.key")]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
    try:
        line = await _read_line(proc, 30)
        address = line.split()[-1]
        assert address.startswith("127.0.0.1:")
        from swarm.net.swarm_key import load_swarm_key

        config = DHTConfig(
            initial_peers=(address,),
            swarm_key=load_swarm_key(tmp_path / "swarm.key"),
            timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5),
        )
        async with DHTNode.open(Identity.from_seed(b"cli-user"), config) as node:
            assert [p for _, p in await node.routing_addresses()] == [int(address.split(":")[1])]
            assert await node.announce("k", {"a": 1}, 10.0) == 1
    finally:
        code = await _stop(proc)
    assert code == 0


async def test_three_processes_of_ten_nodes() -> None:
    procs: list[trio.Process] = []
    keys = [f"proc/block/{i}" for i in range(3)]
    try:
        first = ""
        for index in range(3):
            cmd = [sys.executable, str(NODE_SCRIPT), str(index), first]
            procs.append(await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE))
            address = (await _read_line(procs[-1], 60)).split()[-1]
            first = first or address
        config = DHTConfig(
            initial_peers=(first,), timing=TimingConfig(rpc_timeout=2.0, bootstrap_timeout=10)
        )
        # A lookup under load may miss a replica whose reply came late; a reader looks again,
        # as a client does. A record that no look finds within the deadline fails the test.
        seen: dict[str, tuple[int, set[object]]] = {}
        async with DHTNode.open(Identity.from_seed(b"reader"), config) as reader:
            with trio.move_on_after(60):
                while len(seen) < len(keys) or any(n != 30 for n, _ in seen.values()):
                    found = await reader.get_many(keys)
                    for key in keys:
                        writers = {r.value["proc"] for r in found[key].values() if r.value}
                        if len(found[key]) >= seen.get(key, (0, set()))[0]:
                            seen[key] = (len(found[key]), writers)
        for key in keys:
            assert seen.get(key) == (30, {0, 1, 2}), (key, seen.get(key))
    finally:
        codes = [await _stop(p) for p in procs]
    assert codes == [0, 0, 0]
