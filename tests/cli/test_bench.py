"""`swarm bench` against an in-process swarm: a row per concurrency level, as JSON or a
table; bad options are one error line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from swarm.lab.processes import swarm_command
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

pytestmark = pytest.mark.slow  # runs `swarm bench` and `swarm` processes


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(
        tmp_path_factory.mktemp("bench") / "tiny", num_layers=4, hidden=64, seed=2
    )


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


async def test_bench_sweeps_concurrency(model: Path, tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with open_local_swarm(model, [LayerRange(0, 2), LayerRange(2, 4)]) as local:
            common = [
                "--initial-peers",
                local.dht_address,
                "--concurrency",
                "1,3",
                "--prompt-length",
                "5",
                "--new-tokens",
                "6",
            ]
            as_json = await trio.run_process(
                swarm_command("bench", str(model), *common, "--json"),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=_env(tmp_path),
            )
            as_table = await trio.run_process(
                swarm_command("bench", str(model), *common),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=_env(tmp_path),
            )
    assert as_json.returncode == 0, as_json.stderr.decode(errors="replace")
    rows = json.loads(as_json.stdout)
    assert [row["sessions"] for row in rows] == [1, 3]
    for row in rows:
        assert 0 < row["new_tokens"] <= 6 * row["sessions"]
        assert row["tokens_per_second"] > 0
        assert 0 < row["ttft_p50"] <= row["ttft_p95"]
        assert 0 < row["token_p50"] <= row["token_p95"]
    assert as_table.returncode == 0, as_table.stderr.decode(errors="replace")
    table = as_table.stdout.decode(errors="replace")
    assert "swarm bench" in table and "tokens/s" in table and "TTFT p50" in table


@pytest.mark.parametrize(
    "args", [["--concurrency", "1,x"], ["--concurrency", "0"], ["--new-tokens", "0"], []]
)
def test_bench_refuses_bad_options(args: list[str], tmp_path: Path) -> None:
    peers = ["--initial-peers", "127.0.0.1:1"] if args else []
    done = subprocess.run(
        swarm_command("bench", str(tmp_path / "m"), *peers, *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path),
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
