"""The model that ships inside the `swarm` package, so the demo runs offline."""

from __future__ import annotations

from pathlib import Path

from swarm.errors import ShardError

__all__ = ["DEMO_MODEL_NAME", "demo_model_path"]

DEMO_MODEL_NAME = "swarm-demo"


def demo_model_path() -> Path:
    """The folder of the bundled demo model (Hugging Face format).

    Raises `ShardError` if the package was installed without its model files.
    """
    path = Path(__file__).resolve().parents[1] / "assets" / "models" / DEMO_MODEL_NAME
    if not (path / "model.safetensors").is_file():
        raise ShardError(
            f"the bundled demo model is missing at {path}; reinstall swarm with its package data"
        )
    return path
