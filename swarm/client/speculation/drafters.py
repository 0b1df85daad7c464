"""Drafters: cheap guesses of the next tokens, checked by the target model in one step.

`NgramDrafter` (prompt lookup) needs no model: it finds the latest earlier occurrence of the
text's last few tokens and proposes what followed them. It shines where answers repeat their
input (summaries, quotes, code edits, names in a chat) and proposes nothing otherwise.

`ModelDrafter` runs a small local model whose tokenizer is the target's (checked), with its
own KV cache rolled back to the accepted text each round, and draws its guesses with the
sampler's noise for each position, so that it guesses the target's own choice whenever the
two models' distributions agree (see `swarm.client.speculation.acceptance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Tokenizer

from swarm.client.sampling import Sampler
from swarm.errors import ConfigError
from swarm.shards import KVCache, ModelConfig, load_head, load_span, load_tokenizer
from swarm.shards.hub import resolve_checkpoint
from swarm.types import LayerRange

__all__ = ["Draft", "DraftModel", "Drafter", "ModelDrafter", "NgramDrafter"]


@dataclass(frozen=True)
class Draft:
    """Up to k guessed tokens (possibly none) following the context."""

    tokens: tuple[int, ...]


class Drafter(Protocol):
    """Guesses the tokens after ``context`` (prompt + answer so far); ``first_index`` is the
    answer index of the first guess (for the sampler's per-position noise)."""

    def propose(
        self, context: Sequence[int], k: int, sampler: Sampler, first_index: int
    ) -> Draft: ...


class NgramDrafter:
    """Prompt lookup: match the last ``max_ngram`` .. ``min_ngram`` tokens of the context
    against earlier text (latest match wins) and propose the tokens that followed."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._tokens: list[int] = []
        # n -> n-gram -> the end index (exclusive) of its latest occurrence in _tokens
        self._index: dict[int, dict[tuple[int, ...], int]] = {}

    def propose(self, context: Sequence[int], k: int, sampler: Sampler, first_index: int) -> Draft:
        del sampler, first_index  # a fixed guess: the same whatever the noise
        if k <= 0 or len(context) < 2:
            return Draft(())
        self._sync(context)
        tokens = self._tokens
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            end = self._index.get(n, {}).get(tuple(tokens[-n:]))
            if end is not None:
                return Draft(tuple(tokens[end : end + k]))
        return Draft(())

    def _sync(self, context: Sequence[int]) -> None:
        """Index ``context``: incrementally while it extends what was indexed, else anew."""
        known = len(self._tokens)
        if len(context) < known or list(context[:known]) != self._tokens:
            self._tokens, self._index, known = [], {}, 0
        self._tokens.extend(int(t) for t in context[known:])
        # index every n-gram that ends before the last token (so a match is always followed
        # by at least one token); the n-gram ending at the last token is the query
        for stop in range(max(known - 1, 1), len(self._tokens)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if stop - n >= 0:
                    self._index.setdefault(n, {})[tuple(self._tokens[stop - n : stop])] = stop


class DraftModel:
    """A small model loaded whole in this process, to draft for a target with the same
    tokenizer: the weights, shared by the `ModelDrafter` of every generation. Build with
    `DraftModel.load`."""

    def __init__(self, path: Path, layers: int | None = None) -> None:
        self.path = path
        self.config = ModelConfig.from_pretrained(path)
        depth = self.config.num_hidden_layers if layers is None else layers
        self.head = load_head(path)
        self.span = load_span(path, LayerRange(0, depth))

    @classmethod
    def early_exit(cls, model: str | Path, layers: int) -> DraftModel:
        """The target itself cut after its first ``layers`` layers (its own final norm and
        head on top): a self-speculative drafter that needs no second checkpoint (weaker
        guesses than a trained draft model; no tokenizer check needed)."""
        return cls(resolve_checkpoint(model), layers)

    @classmethod
    def load(cls, model: str | Path, target_tokenizer: Tokenizer | None) -> DraftModel:
        """Load the draft checkpoint (folder, hub name or GGUF file).

        Raises:
            ConfigError: its tokenizer differs from ``target_tokenizer`` (or either is
                missing), so its token ids would mean other text.
            ShardError: the checkpoint cannot be read.
        """
        path = resolve_checkpoint(model)
        tokenizer = load_tokenizer(path)
        if tokenizer is None or target_tokenizer is None:
            raise ConfigError(
                f"draft model {model}: both models need a tokenizer to check they share one"
            )
        if tokenizer.get_vocab(with_added_tokens=True) != target_tokenizer.get_vocab(
            with_added_tokens=True
        ):
            raise ConfigError(
                f"draft model {model} has another tokenizer than the target "
                f"({tokenizer.get_vocab_size()} vs {target_tokenizer.get_vocab_size()} tokens, "
                "or the same count with other ids): its guesses would mean other text"
            )
        return cls(path)


class ModelDrafter:
    """One generation's drafts from a `DraftModel`, with a KV cache of its own rolled back to
    the accepted text each round. Not for concurrent use (one per generation); `propose`
    computes on the calling thread (the token loop runs it in a worker)."""

    def __init__(self, model: DraftModel, max_length: int = 4096) -> None:
        self.model = model
        self.max_length = max_length
        self._cache: KVCache | None = None
        self._tokens: list[int] = []  # what the cache holds, in order

    def propose(self, context: Sequence[int], k: int, sampler: Sampler, first_index: int) -> Draft:
        if k <= 0 or not context:
            return Draft(())
        model = self.model
        cache = self._room(len(context) + k)
        keep = _common_prefix(self._tokens, context)
        keep = min(keep, len(context) - 1)  # the last token is fed again for its logits
        cache.truncate(keep)
        del self._tokens[keep:]
        pending = list(context[keep:])
        guesses: list[int] = []
        with torch.inference_mode():
            for i in range(k):
                ids = torch.tensor([pending])  # (1, n)
                start = len(self._tokens)
                positions = torch.arange(start, start + len(pending)).view(1, -1)  # (1, n)
                hidden = model.span(model.head.embed(ids), positions, cache)  # (1, n, hidden)
                self._tokens.extend(pending)
                logits = model.head.logits(hidden[:, -1:])[:, -1]  # (1, vocab)
                guess = int(sampler.sample(logits, first_index + i)[0])
                guesses.append(guess)
                pending = [guess]
        return Draft(tuple(guesses))

    def _room(self, length: int) -> KVCache:
        if self._cache is None or self._cache.max_length < length:
            size = max(self.max_length, length)
            model = self.model
            self._cache = KVCache.allocate(model.config, model.span.layers, 1, size)
            self._tokens = []  # a fresh cache: the context is read again
        return self._cache


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
