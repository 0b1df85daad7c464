"""`swarm`: the command line. Each subcommand lives in its own module and registers here.

Every command is registered through `swarm_cli.errors.command`, the one place that turns an
error into an ``error: ...`` line and exit status 1. Command modules import torch, trio and
the rest of swarm inside their functions, so ``swarm --help`` answers at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from .api import api as _api
from .bench import bench as _bench
from .chat import chat as _chat
from .demo import demo as _demo
from .dht import dht as _dht
from .errors import command, set_verbose
from .generate import generate as _generate
from .health import monitor as _monitor
from .health import status as _status
from .key import new_key as _new_key
from .selfcheck import selfcheck as _selfcheck
from .serve import serve as _serve

__all__ = ["app"]

app = typer.Typer(
    name="swarm",
    help="Run large language models across many independent GPUs, and check the peers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
key_app = typer.Typer(
    name="key", help="Private-swarm keys.", no_args_is_help=True, add_completion=False
)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the traceback of an error.")
    ] = False,
) -> None:
    """Run large language models across many independent GPUs, and check the peers."""
    from swarm.lab.parent import exit_with_parent

    exit_with_parent()  # a child of `swarm demo`'s process group dies with it
    set_verbose(verbose)


def _register(target: typer.Typer, name: str, fn: Callable[..., Any]) -> None:
    target.command(name=name)(command(fn))


@app.command()
def version() -> None:
    """Print the swarm version."""
    import swarm

    typer.echo(swarm.__version__)


_COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("dht", _dht),
    ("selfcheck", _selfcheck),
    ("serve", _serve),
    ("generate", _generate),
    ("demo", _demo),
    ("chat", _chat),
    ("status", _status),
    ("monitor", _monitor),
    ("api", _api),
    ("bench", _bench),
]
for _name, _fn in _COMMANDS:
    _register(app, _name, _fn)
_register(key_app, "new", _new_key)
app.add_typer(key_app)

if __name__ == "__main__":
    app()
