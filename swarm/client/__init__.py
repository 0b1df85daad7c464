"""swarm.client: route planning, inference sessions with recovery and hedged steps, `RemoteModel`
(DESIGN §7)."""

from swarm.client.config import ClientConfig
from swarm.client.discovery import Discovery, ServerDirectory, StaticDirectory
from swarm.client.model import AsyncRemoteModel, GenerationResult, Token
from swarm.client.remote import RemoteModel
from swarm.client.routing import Hop, ServerView, plan_route
from swarm.client.sampling import SamplingConfig
from swarm.client.session import InferenceSession

__all__ = [
    "AsyncRemoteModel",
    "ClientConfig",
    "Discovery",
    "GenerationResult",
    "Hop",
    "InferenceSession",
    "RemoteModel",
    "SamplingConfig",
    "ServerDirectory",
    "ServerView",
    "StaticDirectory",
    "Token",
    "plan_route",
]
