"""``python -m swarm_cli.lab_serve --liar SPEC <swarm serve arguments>``: a lying server.

The lab's entry point for ``swarm demo --liar`` (see `swarm.lab.liar.liar_command`): the
same ``swarm serve`` command, whose handlers are wrapped by the liar SPEC through the
handler-wrapping seam. ``swarm serve`` has no option for it, so no user's server lies by a
flag; this module is started only by the lab.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

_USAGE = "usage: python -m swarm_cli.lab_serve --liar SPEC MODEL --layers A:B [serve options]"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "--liar":
        print(_USAGE, file=sys.stderr)
        raise SystemExit(2)
    from swarm.errors import ConfigError
    from swarm.lab.liar import liar_wrapper

    try:
        wrap = liar_wrapper(args[1])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from .main import app
    from .serve import WRAP_HANDLERS

    WRAP_HANDLERS.set(wrap)
    app(["serve", *args[2:]])


if __name__ == "__main__":
    main()
