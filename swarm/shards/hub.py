"""Model names: a local folder or GGUF file as it is, or a Hugging Face hub name (``org/name``).

:func:`resolve_checkpoint` turns what a user typed into a local path. A hub name is looked up
in the ``huggingface_hub`` cache first (``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``); only
when it is not there, and offline mode is off (``HF_HUB_OFFLINE=1`` turns it on), are the files
that serving needs downloaded: the config, the safetensors weights (one file, or the index and
its shards), the tokenizer, its config, the chat template and the generation config; never
other weight formats.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from swarm.errors import ShardError

__all__ = ["CHECKPOINT_FILES", "is_hub_name", "resolve_checkpoint"]

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_name(model: str | Path) -> bool:
    """True for ``org/name`` that is not an existing local path."""
    text = os.fspath(model)
    return bool(_HUB_NAME.fullmatch(text)) and not Path(text).exists()


def resolve_checkpoint(
    model: str | Path, *, cache_dir: str | Path | None = None, offline: bool | None = None
) -> Path:
    """The local path of ``model``: itself when it exists, else the cached (or, online, freshly
    downloaded) snapshot of the hub repository ``org/name``.

    ``offline`` defaults to ``HF_HUB_OFFLINE``; ``cache_dir`` to the hub's own default.

    Raises:
        ShardError: the path does not exist and is no hub name, or the repository is not in
            the cache while offline, or cannot be downloaded (the message says which).
    """
    path = Path(model)
    if path.exists():
        return path
    if not is_hub_name(model):
        raise ShardError(f"model {model} does not exist (and is no hub name like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    name = os.fspath(model)
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(
                name,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=list(CHECKPOINT_FILES),
            )
        )
    except LocalEntryNotFoundError as exc:
        if offline:
            raise ShardError(
                f"{name} is not in the Hugging Face cache and offline mode is on "
                f"(HF_HUB_OFFLINE); download it first: huggingface-cli download {name}"
            ) from exc
    try:
        return Path(
            snapshot_download(name, cache_dir=cache_dir, allow_patterns=list(CHECKPOINT_FILES))
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ShardError(f"cannot get {name} from the Hugging Face hub: {exc}") from exc
