"""A checkpoint's tokenizer: ``tokenizer.json`` of a folder, or one built from GGUF metadata.

A GGUF file has no ``tokenizer.json``; it stores the vocabulary, the merges, the token types
and the special ids under ``tokenizer.ggml.*``. For a byte-level BPE vocabulary
(``tokenizer.ggml.model == "gpt2"``, the kind Llama 3, SmolLM, Qwen and most recent models
use) :func:`gguf_tokenizer` builds the same ``tokenizers`` pipeline that ``transformers``'
GGUF loader builds: a BPE model over the vocabulary and merges, the GPT-2 byte-level
pre-tokenizer (or the split expression of a known ``tokenizer.ggml.pre``), control tokens
and the bos/eos/unk/pad tokens as special tokens, user-defined ones as plain added tokens, a
byte-level decoder, and a BOS/EOS post-processor when ``add_bos_token``/``add_eos_token``
say so. SentencePiece vocabularies (``"llama"``, Llama 2 / Mistral) are refused with a clear
error rather than tokenized wrongly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from swarm.errors import ShardError
from swarm.shards.gguf import gguf_metadata, is_gguf

__all__ = ["bytes_to_unicode", "gguf_tokenizer", "load_tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split expression its merges were learned with (others: GPT-2's).
_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")}
_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


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
    """Build the byte-level BPE tokenizer a GGUF file describes (see the module docstring).

    Costs about a second for a 50k vocabulary.

    Raises:
        ShardError: no vocabulary in the file, or a vocabulary model other than ``gpt2``.
    """
    meta = gguf_metadata(path, arrays=_ARRAYS)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ShardError(
            f"{Path(path).name}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', "
            "byte-level BPE); pass token ids instead of text"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ShardError(f"{Path(path).name}: no tokenizer.ggml.tokens in the GGUF metadata")
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
    _add_special_tokens(tokenizer, tokens, meta, alphabet)
    tokenizer.post_processor = _post_processor(tokens, meta)
    return tokenizer


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
    tokenizer: Tokenizer, tokens: Sequence[str], meta: Mapping[str, Any], alphabet: set[str]
) -> None:
    """Control tokens and the bos/eos/unk/pad tokens stay whole and are special; user-defined
    ones stay whole but are text. A control token spelled outside the byte alphabet is a
    llama.cpp mislabel and is skipped (as ``transformers`` does)."""
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    special = [
        t for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL and set(t) <= alphabet
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


def _post_processor(tokens: Sequence[str], meta: Mapping[str, Any]) -> processors.PostProcessor:
    """``<bos> $A <eos>`` as far as ``add_bos_token``/``add_eos_token`` ask for them."""
    ends: list[list[tuple[str, int]]] = [[], []]
    for side, (flag, name) in enumerate((("add_bos_token", "bos"), ("add_eos_token", "eos"))):
        index = _special_id(meta, name, len(tokens))
        if meta.get(f"tokenizer.ggml.{flag}") is True and index is not None:
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
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))
