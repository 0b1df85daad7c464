"""A checkpoint's tokenizer: ``tokenizer.json`` of a folder, or one built from GGUF metadata.

A GGUF file has no ``tokenizer.json``; it stores the vocabulary, the merges (or scores), the
token types and the special ids under ``tokenizer.ggml.*``. :func:`gguf_tokenizer` builds the
same ``tokenizers`` pipeline that ``transformers``' GGUF loader builds, for the two kinds
Llama-architecture files use:

- byte-level BPE (``tokenizer.ggml.model == "gpt2"``: Llama 3, SmolLM, most recent models): a
  BPE model over the vocabulary and merges, the GPT-2 byte-level pre-tokenizer (or the split
  expression of a known ``tokenizer.ggml.pre``), a byte-level decoder;
- SentencePiece BPE (``"llama"``: Llama 2, Mistral, TinyLlama): BPE with byte fallback over
  the vocabulary, merges recovered from the token scores when the file has none, the
  ``▁`` metaspace pre-tokenizer, and BOS added by default;

and for both: control tokens and the bos/eos/unk/pad tokens as special tokens, user-defined
ones as plain added tokens, and a BOS/EOS post-processor as ``add_bos_token`` /
``add_eos_token`` say. Other kinds (``"t5"``, ...) are refused with a clear error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from swarm.errors import ShardError
from swarm.shards.gguf import gguf_metadata
from swarm.shards.gguf_header import is_gguf

__all__ = ["bytes_to_unicode", "gguf_tokenizer", "load_tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split expression its merges were learned with (others: GPT-2's).
_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")}
_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of the checkpoint at ``path``: ``tokenizer.json`` of a folder (None when
    the folder has none), or the one described by a GGUF file's metadata.

    Raises:
        ShardError: the file exists but cannot be read, or the GGUF vocabulary is of a kind
            we cannot build.
    """
    if is_gguf(path):
        return gguf_tokenizer(path)
    file = Path(path) / "tokenizer.json"
    if not file.exists():
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own exception types
        raise ShardError(f"cannot read {file}: {exc}") from exc


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Build the tokenizer a GGUF file describes (see the module docstring).

    Costs about a second for a 50k vocabulary.

    Raises:
        ShardError: no vocabulary in the file, or a vocabulary model other than ``gpt2`` and
            ``llama``.
    """
    meta = gguf_metadata(path, arrays=_ARRAYS)
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ShardError(
            f"{Path(path).name}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', "
            "byte-level BPE, and 'llama', SentencePiece BPE); pass token ids instead of text"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ShardError(f"{Path(path).name}: no tokenizer.ggml.tokens in the GGUF metadata")
    tokenizer = _byte_level(tokens, meta) if kind == "gpt2" else _sentencepiece(tokens, meta)
    _add_special_tokens(tokenizer, tokens, meta, kind == "gpt2")
    tokenizer.post_processor = _post_processor(tokens, meta, default_bos=kind == "llama")
    return tokenizer


def _byte_level(tokens: list[str], meta: Mapping[str, Any]) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): i
        for i, token in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    pairs = [(m[0], m[1]) for m in merges if len(m) == 2]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=pairs,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(tokens: list[str], meta: Mapping[str, Any]) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    given = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    if given:
        pairs = [(m[0], m[1]) for m in given if len(m) == 2]
    else:
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=False)))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer


def _merges_from_scores(
    vocab: Mapping[str, int], scores: Mapping[str, float]
) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-scored merged token first (``transformers``' ``generate_merges``)."""
    merges: list[tuple[str, str, float]] = []
    for merged, score in scores.items():
        local = [
            (merged[:i], merged[i:], score)
            for i in range(1, len(merged))
            if merged[:i] in vocab and merged[i:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _pre_tokenizer(pre: object) -> pre_tokenizers.PreTokenizer:
    split = _PRE_SPLITS.get(str(pre))
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _special_id(meta: Mapping[str, Any], name: str, size: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    return value if isinstance(value, int) and 0 <= value < size else None


def _add_special_tokens(
    tokenizer: Tokenizer, tokens: Sequence[str], meta: Mapping[str, Any], byte_level: bool
) -> None:
    """Control tokens and the bos/eos/unk/pad tokens stay whole and are special; user-defined
    ones stay whole but are text. In a byte-level vocabulary a control token spelled outside
    the byte alphabet is a llama.cpp mislabel and is skipped (as ``transformers`` does)."""
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    alphabet = set(bytes_to_unicode().values())
    special = [
        t
        for t, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL and (not byte_level or set(t) <= alphabet)
    ]
    for name in ("bos", "eos", "unknown", "padding"):
        index = _special_id(meta, name, len(tokens))
        if index is not None and tokens[index] not in special:
            special.append(tokens[index])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    vocab = tokenizer.get_vocab()
    user = [
        t for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED and t in vocab
    ]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _post_processor(
    tokens: Sequence[str], meta: Mapping[str, Any], *, default_bos: bool
) -> processors.PostProcessor:
    """``<bos> $A <eos>`` as far as ``add_bos_token``/``add_eos_token`` ask for them (BOS by
    default for SentencePiece vocabularies that do not say, as llama.cpp does)."""
    ends: list[list[tuple[str, int]]] = [[], []]
    defaults = (default_bos, False)
    for side, (flag, name) in enumerate((("add_bos_token", "bos"), ("add_eos_token", "eos"))):
        index = _special_id(meta, name, len(tokens))
        wanted = meta.get(f"tokenizer.ggml.{flag}", defaults[side])
        if wanted is True and index is not None:
            ends[side].append((tokens[index], index))
    (bos, eos) = ends
    single = " ".join([*(t for t, _ in bos), "$A:0", *(t for t, _ in eos)])
    pair = " ".join([single, *(t for t, _ in bos), "$B:1", *(t for t, _ in eos)])
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(bos + eos))
    )


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))
