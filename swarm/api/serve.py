"""`serve_gateway`: the gateway on Hypercorn's trio worker, in the caller's trio loop.

::

    async with AsyncRemoteModel.open(path, client_config) as model:
        ready = await nursery.start(serve_gateway, model, GatewayConfig(port=0))
        print(ready.url)

The HTTP server, the background refresh of the servers and every generation run in the
same trio loop as the shared `AsyncRemoteModel` (no thread bridge); prompts are rendered and
tokenized in worker threads. Connections are capped, and every send and every request head
has a deadline (`swarm.api.http`).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig

from swarm.api.app import create_app
from swarm.api.config import GatewayConfig
from swarm.api.gateway import Gateway
from swarm.api.http import HttpLimits, serve_http
from swarm.client.model import AsyncRemoteModel
from swarm.shards import ChatTemplate

__all__ = ["GatewayReady", "is_public_bind", "serve_gateway"]

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 75.0  # how long an idle HTTP connection stays open (nginx's default)


@dataclass(frozen=True)
class GatewayReady:
    """What `serve_gateway` reports once it listens: its base URL and its state."""

    url: str  # "http://host:port", the port bound (also when 0 was asked)
    gateway: Gateway


async def serve_gateway(
    model: AsyncRemoteModel,
    config: GatewayConfig,
    template: ChatTemplate | None = None,
    *,
    canary_s: float = 30.0,
    task_status: trio.TaskStatus[GatewayReady] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway of ``model`` until cancelled; ``task_status.started`` gets its
    `GatewayReady` once the socket listens and the servers were looked up once.

    ``template`` renders chats (None: chat requests get 400); ``canary_s``: seconds
    between canary probes of every server (0: none). Raises `ConfigError` for a checkpoint
    without tokenizer, `OSError` when the address cannot be bound.
    """
    if not config.api_keys and is_public_bind(config.host):
        log.warning(
            "swarm api listens on %s WITHOUT an API key: anyone who can reach this address "
            "can use the swarm through it. Give --api-key (or --api-key-file), or listen on "
            "127.0.0.1.",
            config.host,
        )
    gateway = Gateway.create(model, config, template)
    await gateway.refresh()
    app = create_app(gateway)
    hypercorn = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hypercorn.bind = [f"{host}:{config.port}"]
    hypercorn.accesslog = None
    hypercorn.errorlog = logging.getLogger("hypercorn.error")
    hypercorn.graceful_timeout = 2.0
    # Idle keep-alive connections outlive clients' own pool expiry (httpx: 5 s, Hypercorn's
    # default too), so a client never reuses a connection the gateway is closing.
    hypercorn.keep_alive_timeout = KEEP_ALIVE_S
    hypercorn.backlog = min(config.max_connections, 1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run_background, canary_s)
        binds: list[str] = await nursery.start(
            functools.partial(
                serve_http,
                app,
                hypercorn,
                gateway.connections,
                HttpLimits(config.send_timeout_s, config.send_budget_s, config.header_timeout_s),
            )
        )
        task_status.started(GatewayReady(binds[0], gateway))


def is_public_bind(host: str) -> bool:
    """Whether listening on ``host`` is reachable from other machines (anything but a
    loopback address or ``localhost``)."""
    if host in ("localhost", ""):
        return host == ""
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True  # a host name: it may resolve to any interface
