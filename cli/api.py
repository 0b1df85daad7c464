"""`swarm api MODEL --initial-peers HOST:PORT`: an OpenAI-compatible gateway to the swarm.

One long-lived process: one client (DHT node, connection pool, routes, bans, reputation)
shared by every request, each generation its own inference session; FastAPI on Hypercorn's
trio worker in the same trio loop. Prints one readiness line with its URL; Ctrl-C or
SIGTERM stops it (open generations are cancelled and their sessions closed).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import (
    DefaultModelArgument,
    DirectOption,
    PeersOption,
    SpeculativeOption,
    VerboseOption,
    model_path,
)

if TYPE_CHECKING:
    from swarm.api import GatewayConfig
    from swarm.client.config import ClientConfig
    from swarm.shards import ChatTemplate

__all__ = ["api", "gateway_template", "read_api_keys"]


def read_api_keys(keys: list[str] | None, key_file: Path | None) -> tuple[str, ...]:
    """``--api-key`` values and the non-empty lines of ``--api-key-file``."""
    from swarm.errors import ConfigError

    out = [k.strip() for k in keys or ()]
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-key-file {key_file}: {exc}") from exc
        out += [line.strip() for line in text.splitlines() if line.strip()]
        if not out:
            raise ConfigError(f"--api-key-file {key_file} holds no key")
    if any(not key for key in out):
        raise ConfigError("--api-key is empty")
    return tuple(out)


def gateway_template(path: Path, template_file: Path | None) -> ChatTemplate | None:
    """``--chat-template FILE``, else the checkpoint's, else for the bundled demo model a
    simple ``role: content`` template, else None (chat requests get 400)."""
    from swarm.api import SIMPLE_CHAT_TEMPLATE
    from swarm.errors import ConfigError
    from swarm.shards import ChatTemplate, load_chat_template
    from swarm.shards.bundled import demo_model_path

    if template_file is not None:
        try:
            source = template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--chat-template {template_file}: {exc}") from exc
        found = load_chat_template(path)
        return ChatTemplate(
            source, found.bos_token if found else "", found.eos_token if found else ""
        )
    template = load_chat_template(path)
    if template is None and path.resolve() == demo_model_path():
        return ChatTemplate(SIMPLE_CHAT_TEMPLATE.read_text(encoding="utf-8"))
    return template


def api(
    model: DefaultModelArgument = None,
    initial_peers: PeersOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).")] = 8000,
    api_key: Annotated[
        list[str] | None,
        typer.Option("--api-key", help="Require Authorization: Bearer KEY (repeatable)."),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File of accepted API keys, one a line.")
    ] = None,
    verify: Annotated[
        str, typer.Option(help="Default policy: none, spot-check:P, redundant:K, optimistic.")
    ] = "none",
    max_concurrent: Annotated[int, typer.Option(help="Generations running at once.")] = 8,
    queue: Annotated[int, typer.Option(help="Requests waiting for a slot, then 429.")] = 32,
    max_length: Annotated[
        int, typer.Option(help="Prompt + answer tokens at most (0: the model's positions).")
    ] = 0,
    chat_template: Annotated[
        Path | None, typer.Option(help="Jinja chat template file (default: the checkpoint's).")
    ] = None,
    name: Annotated[
        str, typer.Option(help="Model name clients use (default: the checkpoint's name).")
    ] = "",
    swarm_key: Annotated[Path | None, typer.Option(help="Private-swarm key file.")] = None,
    canary_interval: Annotated[
        float, typer.Option(help="Seconds between canary probes of the servers (0: none).")
    ] = 30.0,
    reputation: Annotated[
        Path | None, typer.Option(help="Reputation file (default ~/.cache/swarm/reputation.json).")
    ] = None,
    speculative: SpeculativeOption = "auto",
    direct: DirectOption = True,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Host name a keyless gateway answers to, besides IP addresses and "
            "localhost (repeatable).",
        ),
    ] = None,
    max_redundancy: Annotated[
        int, typer.Option(help="Largest K of redundant:K a request may ask.")
    ] = 3,
    max_connections: Annotated[
        int,
        typer.Option(
            help="Open HTTP connections at most (when full, a host holding fewer takes the "
            "place of an idle one of the host holding the most)."
        ),
    ] = 512,
    max_connections_per_host: Annotated[
        int, typer.Option(help="Open HTTP connections from one address at most.")
    ] = 64,
    send_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client may leave a send unread before it loses "
            "its connection (and its generation)."
        ),
    ] = 30.0,
    send_budget: Annotated[
        float,
        typer.Option(
            help="Seconds the sends of one answer may wait for a slow reader in all before "
            "it loses its connection (and its generation)."
        ),
    ] = 60.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request body may take to arrive.")
    ] = 30.0,
    header_timeout: Annotated[
        float,
        typer.Option(help="Seconds a request head may take to arrive after its first byte."),
    ] = 10.0,
    verbose: VerboseOption = False,
) -> None:
    """Serve MODEL on the swarm behind an OpenAI-compatible HTTP API."""
    import dataclasses

    import trio

    from swarm.api import GatewayConfig
    from swarm.client.config import ClientConfig, SpeculationConfig
    from swarm.errors import ConfigError
    from swarm.net.punch import DEFAULT_PUNCH_CONFIG
    from swarm.net.swarm_key import load_swarm_key

    if not initial_peers:
        raise ConfigError("no --initial-peers: give the host:port of a DHT node")
    if canary_interval < 0:
        raise ConfigError("--canary-interval must be 0 or more seconds")
    path = model_path(model)
    gateway_config = GatewayConfig(
        host=host,
        port=port,
        model_name=name,
        api_keys=read_api_keys(api_key, api_key_file),
        max_concurrent=max_concurrent,
        queue=queue,
        verify=verify,
        max_length=max_length,
        allowed_hosts=tuple(allowed_host or ()),
        max_redundancy=max_redundancy,
        max_connections=max_connections,
        max_connections_per_host=max_connections_per_host,
        send_timeout_s=send_timeout,
        send_budget_s=send_budget,
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
    )
    client_config = ClientConfig(
        initial_peers=tuple(initial_peers),
        swarm_key=load_swarm_key(swarm_key) if swarm_key else None,
        speculation=SpeculationConfig(mode=speculative),
        direct=DEFAULT_PUNCH_CONFIG if direct else None,
    )
    if reputation is not None:
        client_config = dataclasses.replace(
            client_config,
            records=dataclasses.replace(client_config.records, reputation_path=str(reputation)),
        )
    template = gateway_template(path, chat_template)
    trio.run(_serve, path, client_config, gateway_config, template, canary_interval)


async def _serve(
    path: Path,
    client_config: ClientConfig,
    gateway_config: GatewayConfig,
    template: ChatTemplate | None,
    canary_s: float,
) -> None:
    import functools

    import trio

    from swarm.api import serve_gateway
    from swarm.client.model import AsyncRemoteModel

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with AsyncRemoteModel.open(path, client_config) as model:
            async with trio.open_nursery() as nursery:
                run = functools.partial(
                    serve_gateway, model, gateway_config, template, canary_s=canary_s
                )
                ready = await nursery.start(run)
                chat = "chat and completions" if template is not None else "completions only"
                print(
                    f"ready: swarm api at {ready.url} (OpenAI API at {ready.url}/v1, "
                    f"status page at {ready.url}/; model {ready.gateway.facts.name}, "
                    f"{chat})",
                    flush=True,
                )
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    print("stopped", flush=True)
