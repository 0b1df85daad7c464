"""Turning generated ids into text pieces, stopping at stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from swarm.errors import ConfigError
from swarm.shards.tokenizer import load_tokenizer as shard_tokenizer

__all__ = ["StopText", "load_tokenizer"]


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer: ``tokenizer.json`` of a folder (None when it has none) or
    the one a GGUF file's metadata describes (see :mod:`swarm.shards.tokenizer`).

    Raises `ShardError` if the tokenizer exists but cannot be read or built.
    """
    return shard_tokenizer(path)


class StopText:
    """Decodes new ids incrementally and finds stop strings.

    `push` returns the text that is safe to show (text that could still become the start of
    a stop string, or a half-decoded character, is held back) and whether a stop string was
    reached; the returned text never contains the stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ConfigError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one id; returns (new safe text, stopped)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text)), True
        safe = len(self.text) - self._hold
        if self.text.endswith("\ufffd"):  # a character split across tokens
            safe = min(safe, len(self.text) - 1)
        return self._emit(max(safe, self.emitted)), False

    def flush(self) -> str:
        """The rest of the text (at the end of generation)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece
