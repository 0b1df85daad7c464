"""The status page says which path each server's hop takes: relayed, upgraded (a relayed
server reached over a direct connection made through its relay), or nothing for direct."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

import swarm.api

TEMPLATES = Path(swarm.api.__file__).parent / "templates"


def server(name: str, path: str, upgraded: bool) -> dict[str, Any]:
    return {
        "peer": name, "short": name, "address": f"127.0.0.1:{len(name)}", "path": path,
        "upgraded": upgraded, "state": "online", "start": 0, "stop": 2, "throughput": 1.0,
        "active_sessions": 0, "free_cache_tokens": 0, "ping_ms": None, "canary": None,
        "banned": False,
    }  # fmt: skip


def test_the_status_page_marks_relayed_and_upgraded_servers() -> None:
    pages = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    data = {
        "gateway": {}, "health": {"ok": True}, "model": {"num_blocks": 2}, "coverage": [3, 3],
        "servers": [
            server("plain", "direct", False), server("behind", "relayed", False),
            server("punched", "direct", True),
        ],
    }  # fmt: skip
    html = pages.get_template("status_main.html").render(data=data, key="", now="00:00:00")
    rows = {
        name: row
        for row in html.split('<tr class="server"')[1:]
        for name in ("plain", "behind", "punched")
        if f'data-peer="{name}"' in row
    }
    assert ">relayed</span>" in rows["behind"] and ">upgraded</span>" not in rows["behind"]
    assert ">upgraded</span>" in rows["punched"] and ">relayed</span>" not in rows["punched"]
    assert ">relayed</span>" not in rows["plain"] and ">upgraded</span>" not in rows["plain"]
