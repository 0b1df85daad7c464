"""`swarm chat` as a user runs it: lines on stdin, answers streamed, /reset and /exit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from swarm.lab.processes import swarm_command
from swarm.lab.reference import generate_locally
from swarm.server.config import ServerConfig
from swarm.shards import Quantization, load_chat_template, load_tokenizer
from swarm.testing.checkpoints import write_random_gguf
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

pytestmark = pytest.mark.slow  # runs `swarm chat` processes

NEW_TOKENS = 5


def _expected_answer(path: Path, message: str) -> str:
    """The greedy answer of a fresh conversation, as text."""
    template, tokenizer = load_chat_template(path), load_tokenizer(path)
    assert template is not None and tokenizer is not None
    text = template.render([{"role": "user", "content": message}])
    ids = generate_locally(path, tokenizer.encode(text, add_special_tokens=False).ids, NEW_TOKENS)
    answer = ids.ids[: ids.ids.index(2) + 1] if 2 in ids.ids else ids.ids
    return str(tokenizer.decode(answer, skip_special_tokens=True))


async def test_chat_command_turns_reset_and_exit(tmp_path: Path) -> None:
    model = write_random_gguf(tmp_path / "tiny-chat.gguf", qtype="Q8_0", num_layers=2, seed=5)
    lines = "the cat sat\n/reset\non the mat\n/exit\n"
    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    with trio.fail_after(180):
        # float weights, as the reference computes (a Q8_0 file is served int8 by default,
        # and a random model's near-ties tip with the rounding)
        config = ServerConfig(model=model, announce_ttl=30.0, quant=Quantization.NONE)
        ranges = [LayerRange(0, 1), LayerRange(1, 2)]
        async with open_local_swarm(model, ranges, config=config) as local:
            argv = swarm_command(
                "chat",
                str(model),
                "--initial-peers",
                local.dht_address,
                "--max-new-tokens",
                str(NEW_TOKENS),
                "--max-length",
                "256",
            )
            done = await trio.run_process(
                argv,
                stdin=lines.encode(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert out.count("assistant:") == 2 and "(conversation forgotten)" in out
    answers = [part.split("\n", 1)[0] for part in out.split("assistant: ")[1:]]
    assert all(answers) and answers[0] == _expected_answer(model, "the cat sat")
    assert answers[1] == _expected_answer(model, "on the mat")  # after /reset: a fresh chat


@pytest.mark.parametrize("args", [["--max-new-tokens", "0"], []])
def test_chat_command_refuses_bad_options(args: list[str], tmp_path: Path) -> None:
    import subprocess

    peers = [] if not args else ["--initial-peers", "127.0.0.1:1"]
    done = subprocess.run(
        swarm_command("chat", str(tmp_path / "m.gguf"), *peers, *args),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")


async def test_ctrl_c_stops_the_answer_not_the_chat(tmp_path: Path) -> None:
    import signal
    import subprocess

    model = write_random_gguf(tmp_path / "tiny-chat.gguf", qtype="Q8_0", num_layers=2, seed=5)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    with trio.fail_after(180):
        async with open_local_swarm(model, [LayerRange(0, 2)]) as local:
            argv = swarm_command(
                "chat",
                str(model),
                "--initial-peers",
                local.dht_address,
                "--max-new-tokens",
                "900",
                "--max-length",
                "1024",
            )
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
            )
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send_all(b"the cat sat\n")
            seen = b""
            while b"assistant: " not in seen or len(seen.split(b"assistant: ")[1]) < 3:
                seen += await proc.stdout.receive_some()
            proc.send_signal(signal.SIGINT)  # mid-answer: 900 tokens take far longer
            while b"(stopped" not in seen:
                seen += await proc.stdout.receive_some()
            await proc.stdin.send_all(b"/exit\n")
            while chunk := await proc.stdout.receive_some():
                seen += chunk
            assert await proc.wait() == 0
    assert seen.count(b"assistant: ") == 1
