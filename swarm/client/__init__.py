"""swarm.client: route planning, chains of hops with recovery and hedged steps (`Chain`),
`RemoteModel` and its token loop (DESIGN §7)."""

from swarm.client.chain import Chain, StepResult
from swarm.client.config import (
    ClientConfig,
    FailureConfig,
    HedgeConfig,
    PingConfig,
    PipelineConfig,
    RecordsConfig,
)
from swarm.client.discovery import Discovery, ServerDirectory, StaticDirectory
from swarm.client.generation import Done, Event, RolledBack, StopReason
from swarm.client.model import AsyncRemoteModel, GenerationResult, Token
from swarm.client.remote import RemoteModel
from swarm.client.routing import Hop, ServerView, plan_route
from swarm.client.sampling import SamplingConfig

__all__ = [
    "AsyncRemoteModel",
    "Chain",
    "ClientConfig",
    "Discovery",
    "Done",
    "Event",
    "FailureConfig",
    "GenerationResult",
    "HedgeConfig",
    "Hop",
    "PingConfig",
    "PipelineConfig",
    "RecordsConfig",
    "RemoteModel",
    "RolledBack",
    "SamplingConfig",
    "ServerDirectory",
    "ServerView",
    "StaticDirectory",
    "StepResult",
    "StopReason",
    "Token",
    "plan_route",
]
