"""swarm.api: the gateway, an OpenAI-compatible HTTP API in front of the swarm (DESIGN §11).

`serve_gateway` runs it (FastAPI on Hypercorn's trio worker, in the trio loop of one shared
`AsyncRemoteModel`); `create_app` builds the ASGI app of a `Gateway`; `GatewayConfig`
holds every knob. Imports FastAPI, so it is not imported by ``import swarm``.
"""

from pathlib import Path

from swarm.api.app import create_app
from swarm.api.config import GatewayConfig
from swarm.api.gateway import Gateway
from swarm.api.serve import GatewayReady, serve_gateway

__all__ = [
    "SIMPLE_CHAT_TEMPLATE",
    "Gateway",
    "GatewayConfig",
    "GatewayReady",
    "create_app",
    "serve_gateway",
]

# A plain "role: content" chat template, for checkpoints without one (the bundled demo model).
SIMPLE_CHAT_TEMPLATE = Path(__file__).parent / "simple_chat_template.jinja"
