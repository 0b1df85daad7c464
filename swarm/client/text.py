"""Turning generated ids into text pieces, stopping at stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from swarm.errors import ConfigError
from swarm.shards.tokenizer import load_tokenizer as shard_tokenizer

__all__ = ["IncrementalDecoder", "StopText", "load_tokenizer"]


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer: ``tokenizer.json`` of a folder (None when it has none) or
    the one a GGUF file's metadata describes (see :mod:`swarm.shards.tokenizer`).

    Raises `ShardError` if the tokenizer exists but cannot be read or built.
    """
    return shard_tokenizer(path)


class IncrementalDecoder:
    """Turns ids into text one id at a time, decoding only a bounded window of recent ids.

    Decoding the whole answer on every token costs O(n) per token (11.5 ms at 32k ids, so
    O(n^2) per answer); this decodes the ids since the last emitted piece together with a
    few ids before them (``context``, so tokenizers that drop a word's leading space at the
    start of a decode still place it right) and returns only the new characters. A piece
    that ends in a half-decoded character (U+FFFD) is held back until the character
    completes, at most ``max_pending`` ids: past that the replacement characters are
    emitted, so a stream of bytes that never form a character cannot grow the window.

    The concatenation of the pieces equals ``tokenizer.decode(ids, skip_special_tokens=...)``
    for the tokenizers this project uses (byte-level BPE and SentencePiece-style with byte
    fallback), except where ids spell invalid UTF-8: byte fallback then replaces a whole run
    of byte ids, and the pieces may already hold the valid characters of that run. Each
    `push` costs one to three decodes of at most ``context + 2 * max_pending`` ids.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        context: int = 6,
        max_pending: int = 16,
    ) -> None:
        if context < 1 or max_pending < 1:
            raise ConfigError("context and max_pending must be at least 1")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.context = context
        self.max_pending = max_pending
        self._window: list[int] = []  # some emitted ids for context, then pending ones
        self._bounds = [0]  # window positions where a piece ended; the last: emitted so far

    def push(self, token_id: int) -> str:
        """Add one id; returns the new text it completes ("" while a character is split)."""
        self._window.append(token_id)
        if self._decode(self._window).endswith("\ufffd") and self._pending() < self.max_pending:
            return ""
        return self._emit()

    def flush(self) -> str:
        """Text of ids still held back (a split character at the end: U+FFFD)."""
        return self._emit() if self._pending() else ""

    def _pending(self) -> int:
        return len(self._window) - self._bounds[-1]

    def _emit(self) -> str:
        window, done = self._window, self._bounds[-1]
        before = self._decode(window[:done]) if done else ""
        after = self._decode(window)
        start = len(before) if after.startswith(before) else _common(before, after)
        piece = after[start:]
        # keep about ``context`` ids, cut where an earlier piece ended: there the text was
        # whole, so the kept ids decode alone as they did in the whole answer
        self._bounds.append(len(window))
        target = len(window) - self.context
        cut = max((b for b in self._bounds if b <= target), default=0)
        if cut:
            del window[:cut]
            self._bounds = [b - cut for b in self._bounds if b >= cut]
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _common(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
        self._decoder = IncrementalDecoder(tokenizer)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one id; returns (new safe text, stopped). Costs a bounded decode (see
        `IncrementalDecoder`) and a stop-string search of the new text only."""
        self.ids.append(token_id)
        return self._add(self._decoder.push(token_id))

    def flush(self) -> str:
        """The rest of the text (at the end of generation)."""
        piece, _ = self._add(self._decoder.flush())
        return piece + self._emit(len(self.text))

    def _add(self, piece: str) -> tuple[str, bool]:
        if self.stopped or not piece:
            return "", self.stopped
        start = max(0, len(self.text) - self._hold)  # a stop string may begin in held text
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text)), True
        return self._emit(max(len(self.text) - self._hold, self.emitted)), False

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece
