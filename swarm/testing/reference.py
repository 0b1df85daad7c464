"""The single-process baseline tests compare the swarm's tokens with (`swarm.lab.reference`)."""

from swarm.lab.reference import LocalGeneration, LocalModel, generate_locally

__all__ = ["LocalGeneration", "LocalModel", "generate_locally"]
