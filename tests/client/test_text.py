"""Incremental detokenization: the pieces add up to the whole decode, each push decodes a
bounded window, and stop strings are found across pieces."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from swarm.client.text import IncrementalDecoder, StopText

DEMO_TOKENIZER = Path(__file__).parents[2] / "swarm/assets/models/swarm-demo/tokenizer.json"
TEXTS = ["the cat sat on the mat", "héllo\nworld 東京 🐈‍⬛!", "  two  spaces", "a.b,c;d"]


def sentencepiece_tokenizer() -> Tokenizer:
    """A Llama-style tokenizer: byte fallback, ``▁`` for spaces, the first space stripped."""
    pieces = "▁ t h e c a s o n m ▁t ▁th ▁the at ▁c ▁cat ▁s ▁sat on ▁on ▁m ▁mat".split(" ")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {p: 259 + i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def tokenizers() -> list[Tokenizer]:
    return [Tokenizer.from_file(str(DEMO_TOKENIZER)), sentencepiece_tokenizer()]


class CountingTokenizer:
    """A tokenizer whose decode records the longest id list it was given."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def random_answers(tok: Tokenizer, seed: int, count: int = 200) -> list[list[int]]:
    """Random ids that spell valid UTF-8: whole tokens, and byte tokens only in runs that
    form characters (byte fallback turns a whole run with an invalid byte into U+FFFD)."""
    rng = random.Random(seed)
    vocab = tok.get_vocab(with_added_tokens=True)
    pieces = [i for t, i in vocab.items() if not t.startswith("<0x")]
    chars = "aé東🐈‍⬛ \n!"
    out = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < rng.randrange(1, 80):
            if rng.random() < 0.7 or "<0x41>" not in vocab:
                ids.append(rng.choice(pieces))
            else:
                data = rng.choice(chars).encode()
                ids += [vocab[f"<0x{b:02X}>"] for b in data]
        out.append(ids)
    return out


@pytest.mark.parametrize("index", [0, 1])
def test_pieces_add_up_to_the_whole_decode(index: int) -> None:
    tok = tokenizers()[index]
    cases = [tok.encode(text).ids for text in TEXTS] + random_answers(tok, index)
    for ids in cases:
        decoder = IncrementalDecoder(tok)  # type: ignore[arg-type]
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == tok.decode(ids, skip_special_tokens=True), ids


def test_each_push_decodes_a_bounded_window() -> None:
    counting = CountingTokenizer(Tokenizer.from_file(str(DEMO_TOKENIZER)))
    decoder = IncrementalDecoder(counting, context=6, max_pending=16)  # type: ignore[arg-type]
    ids = counting.inner.encode("a long answer, word after word " * 400).ids
    assert len(ids) > 2000
    for i in ids:
        decoder.push(i)
    assert counting.longest <= 6 + 2 * 16


def test_bytes_that_never_form_a_character_are_emitted_after_max_pending() -> None:
    tok = sentencepiece_tokenizer()
    lone = tok.token_to_id("<0xE6>")  # a lead byte, repeated: never a whole character
    decoder = IncrementalDecoder(tok, max_pending=4)  # type: ignore[arg-type]
    pieces = [decoder.push(lone) for _ in range(12)]
    assert all(p == "" for p in pieces[:3]) and pieces[3]  # held 3, then given up on
    assert "".join(pieces) + decoder.flush() == tok.decode([lone] * 12)


def test_stop_text_finds_a_stop_string_split_across_pieces() -> None:
    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    ids = tok.encode("one two three. four five").ids
    text = StopText(tok, stop=["three.", "nothing"])
    shown = ""
    for i in ids:
        piece, stopped = text.push(i)
        shown += piece
        if stopped:
            break
    assert stopped and shown == "one two " and text.text == "one two "
    assert text.flush() == ""
    whole = StopText(tok)
    streamed = "".join(whole.push(i)[0] for i in ids) + whole.flush()
    assert streamed == whole.text == "one two three. four five"
