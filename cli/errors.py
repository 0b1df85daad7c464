"""One place where every `swarm` command turns an exception into one line for the user.

Each command is registered through `command` (see `swarm_cli.main`): an error the user can
act on becomes ``error: <what happened and how to fix it>`` on stderr and exit status 1;
Ctrl-C becomes ``interrupted`` and exit status 130. ``--verbose`` (the global
``swarm --verbose ...`` or a command's own ``--verbose``) prints the traceback as well.

Errors raised inside a trio nursery arrive wrapped in exception groups; they are unwrapped
here, so a user never reads a 200-line group traceback for a mistyped option.
"""

from __future__ import annotations

import errno
import functools
import sys
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click
import typer

from .output import end_stdout_line, setup_logging

__all__ = ["command", "describe", "set_verbose"]

P = ParamSpec("P")
R = TypeVar("R")

_verbose = False

# Exceptions that are not errors of the program but its normal way out.
_PASS_THROUGH: tuple[type[BaseException], ...] = (
    typer.Exit,  # not click's Exit (it is a RuntimeError)
    click.exceptions.Exit,
    click.ClickException,
    click.exceptions.Abort,
    SystemExit,
)


# How to fix errors whose message says only what happened (matched on how they start).
_HINTS = (
    (
        "none of the initial DHT peers answered",
        "; check the host:port, and that `swarm dht` or a server runs there",
    ),
)


def set_verbose(on: bool) -> None:
    """Show tracebacks (``swarm --verbose``); commands with their own flag call it too."""
    global _verbose
    _verbose = _verbose or on


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception that matters inside (nested) exception groups (`unwrap_group`);
    a Ctrl-C anywhere in a group that holds no error is the Ctrl-C."""
    from swarm.errors import unwrap_group

    inner = unwrap_group(exc)
    if isinstance(inner, BaseExceptionGroup):
        interrupts = inner.subgroup(KeyboardInterrupt)
        if interrupts is not None:
            return unwrap_group(interrupts)
    return inner


def describe(exc: BaseException) -> str:
    """The one line (without ``error:``) that tells the user what went wrong and what to do."""
    from swarm.errors import SwarmError

    text = str(exc).strip() or type(exc).__name__
    in_use = "address already in use" in text.lower()
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        in_use = True
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"address already in use{where}"
    if in_use:
        return f"{text}; choose another port (0 picks a free one) or stop what holds it"
    if isinstance(exc, SwarmError):
        return text + next((hint for start, hint in _HINTS if text.startswith(start)), "")
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"{exc.strerror}: {exc.filename}" if exc.filename else text
    if isinstance(exc, OSError):
        return text
    return f"unexpected {type(exc).__name__}: {text} (run with --verbose for the traceback)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def command(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command function: one ``error:`` line and exit 1 for any error, exit 130 on
    Ctrl-C. The wrapped function keeps its signature (typer reads its options from it)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        set_verbose(bool(kwargs.get("verbose")))
        setup_logging(_verbose)  # commands that want timestamps set it up again
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except BaseException as raised:
            exc = _unwrap(raised)
            if isinstance(exc, _PASS_THROUGH):
                raise exc from None
            if _verbose:
                traceback.print_exception(raised, file=sys.stderr)
            end_stdout_line()  # a half-streamed line ends before the error
            if isinstance(exc, KeyboardInterrupt):
                print("interrupted", file=sys.stderr, flush=True)
                raise typer.Exit(130) from None
            print(f"error: {_one_line(describe(exc))}", file=sys.stderr, flush=True)
            raise typer.Exit(1) from None

    return wrapper
