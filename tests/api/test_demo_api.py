"""`swarm demo --api` leaves the demo swarm running behind a gateway until Ctrl-C: a chat
through the gateway works, and Ctrl-C stops every process the demo started."""

from __future__ import annotations

import signal
import time

import httpx2 as httpx
import pytest

from swarm.lab.processes import ProcessGroup, swarm_command

pytestmark = pytest.mark.slow


def test_demo_api_serves_until_ctrl_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with ProcessGroup(env={"HOME": str(tmp_path)}) as group:
        demo = group.start(
            "demo",
            swarm_command(
                "demo",
                "--model",
                "swarm-demo",
                "--servers",
                "2",
                "--max-new-tokens",
                "4",
                "--api",
                "--api-port",
                "0",
            ),
        )
        url = demo.wait_for_line(r"OpenAI API at (http://[\d.:]+)/v1", 180).group(1)
        body = {
            "model": "swarm-demo",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 5,
            "temperature": 0,
        }
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] >= 1
        assert len(answer["swarm"]["route"]) == 2  # the demo's two servers
        demo.popen.send_signal(signal.SIGINT)
        assert demo.wait_exit(60) == 0, "\n".join(demo.stderr_lines[-20:])
        assert any("stopping the gateway" in line for line in demo.lines)
        deadline = time.monotonic() + 20
        while group.leftovers() - {demo.pid} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group.leftovers() - {demo.pid} == set(), "the demo left processes behind"
