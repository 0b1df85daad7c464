"""What the commands print: results on stdout, everything else on stderr, on its own line.

Tokens stream to stdout without newlines. A log record or warning written to stderr while a
streamed line is half done would land inside the text when both go to one terminal (or one
file, with ``2>&1``), so `setup_logging` installs a handler that first ends the stdout line
in that case. Warnings and logs never go to stdout.

A generation's events (`Token`, `RolledBack`, `Done`) are written by `EventWriter`, so that
stdout ends holding the final text once: on a terminal tokens show as they come and a
rollback erases the text it voids; elsewhere (a pipe, a file) tokens stream only when nothing
can roll them back (the policy ``none``), and otherwise the text is written once it is final.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from swarm.client.generation import Event

__all__ = ["EventWriter", "end_stdout_line", "setup_logging", "warn"]

log = logging.getLogger("swarm_cli")


class _LineTracker:
    """Stands in for ``sys.stdout`` and remembers whether the last write ended a line."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self.mid_line = False

    def write(self, text: str) -> int:
        written = self.inner.write(text)
        if text:
            self.mid_line = not text.endswith("\n")
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _tracker() -> _LineTracker:
    if not isinstance(sys.stdout, _LineTracker):
        sys.stdout = _LineTracker(sys.stdout)  # type: ignore[assignment]
    return sys.stdout  # type: ignore[return-value]


def _same_destination(a: TextIO, b: TextIO) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def end_stdout_line() -> None:
    """If stdout holds a half-written line and stderr shows up in the same place, end it."""
    out = sys.stdout
    if isinstance(out, _LineTracker) and out.mid_line:
        if _same_destination(out.inner, sys.stderr):
            out.write("\n")
        out.flush()


class _OwnLineHandler(logging.Handler):
    """Writes each record to stderr as ``level: message``, never inside a streamed line."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__()
        fmt = "%(asctime)s " if timestamps else ""
        self.setFormatter(logging.Formatter(fmt + "%(levelname)s: %(message)s"))

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            end_stdout_line()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool | None = None, *, timestamps: bool = False) -> None:
    """Route logging and Python warnings to stderr on their own lines (INFO with
    ``verbose``, WARNING without, the level set before when None) and start tracking
    stdout's half-written lines. Every command gets this from `swarm_cli.errors.command`;
    long-running ones call it again with ``timestamps``."""
    _tracker()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _OwnLineHandler):
            root.removeHandler(handler)
    root.addHandler(_OwnLineHandler(timestamps))
    if verbose is not None:
        root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)


def warn(message: str) -> None:
    """A warning for the user: ``warning: message`` on stderr, on its own line."""
    log.warning("%s", message)


class EventWriter:
    """Writes a generation's events to ``out`` (stdout by default): token text, or ids as
    ``"<id> "`` when ``as_ids``. Tokens show as they come on a terminal (a rollback erases
    what it voids) or when ``may_roll_back`` is False; elsewhere the text is written once
    final, at `Done` (see `AnswerText`)."""

    def __init__(
        self, *, as_ids: bool = False, may_roll_back: bool = True, out: TextIO | None = None
    ) -> None:
        from swarm.client.generation import AnswerText

        self.out = out if out is not None else sys.stdout
        self.terminal = _isatty(self.out)
        self.answer = AnswerText(hold=may_roll_back and not self.terminal, as_ids=as_ids)
        self.rollbacks = 0

    def __call__(self, event: Event) -> None:
        """Take one event (`Token`, `RolledBack` or `Done`)."""
        from swarm.client.generation import RolledBack

        if isinstance(event, RolledBack):
            self.rollbacks += 1
        before = self.answer.shown
        erase, piece = self.answer.push(event)
        if erase:  # only where tokens show as they come: a terminal
            kept = before[: len(before) - erase]
            up = before[len(kept) :].count("\n")
            self.out.write("\r" + (f"\x1b[{up}A" if up else "") + "\x1b[J")
            self.out.write(kept.rsplit("\n", 1)[-1])
        if piece:
            self.out.write(piece)
        if erase or piece:
            self.out.flush()


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
