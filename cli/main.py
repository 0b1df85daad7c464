"""`swarm`: the command line. Each subcommand lives in its own module and registers here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="swarm",
    help="Run large language models across many independent GPUs, and check the peers.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Run large language models across many independent GPUs, and check the peers."""


@app.command()
def version() -> None:
    """Print the swarm version."""
    import swarm

    typer.echo(swarm.__version__)


from swarm_cli.dht import dht as _dht  # noqa: E402

app.command(name="dht")(_dht)

from swarm_cli.selfcheck import selfcheck as _selfcheck  # noqa: E402

app.command(name="selfcheck")(_selfcheck)

from swarm_cli.serve import serve as _serve  # noqa: E402

app.command(name="serve")(_serve)

from swarm_cli.generate import generate as _generate  # noqa: E402

app.command(name="generate")(_generate)

from swarm_cli.demo import demo as _demo  # noqa: E402

app.command(name="demo")(_demo)

from swarm_cli.health import monitor as _monitor  # noqa: E402
from swarm_cli.health import status as _status  # noqa: E402

app.command(name="status")(_status)
app.command(name="monitor")(_monitor)

if __name__ == "__main__":
    app()
