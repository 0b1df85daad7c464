"""`swarm key new FILE`: make a private-swarm key (give the file to every peer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import VerboseOption

__all__ = ["new_key"]


def new_key(
    file: Annotated[Path, typer.Argument(help="Where to write the key (must not exist).")],
    verbose: VerboseOption = False,
) -> None:
    """Write a new random swarm key to FILE (mode 0600). Every peer of the private swarm
    runs with --swarm-key FILE; peers without it can neither connect nor read the DHT."""
    from swarm.errors import ConfigError
    from swarm.net.swarm_key import create_swarm_key

    path = file.expanduser()
    if path.exists():
        raise ConfigError(
            f"{path} already exists; pick a new file name (a key is never overwritten: "
            "peers holding the old one would be locked out)"
        )
    try:
        create_swarm_key(path)
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists; pick a new file name") from exc
    typer.echo(
        f"wrote a new swarm key to {path} (mode 0600); start every peer of the "
        f"private swarm with --swarm-key {path}"
    )
