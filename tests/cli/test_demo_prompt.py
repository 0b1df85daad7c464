"""`swarm demo`'s prompt: a user message through the model's chat template, or plain text."""

from __future__ import annotations

from pathlib import Path

from swarm_cli.demo import BUNDLED, prepare_prompt, resolve_model

from swarm.shards import load_chat_template, load_tokenizer
from swarm.shards.bundled import demo_model_path
from swarm.testing.checkpoints import write_random_gguf


def test_chat_prompt_is_the_rendered_template(tmp_path: Path) -> None:
    path = write_random_gguf(tmp_path / "tiny.gguf", num_layers=1)
    got = prepare_prompt(path, "the cat")
    template, tokenizer = load_chat_template(path), load_tokenizer(path)
    assert template is not None and tokenizer is not None
    text = template.render([{"role": "user", "content": "the cat"}])
    assert got.chat and text.endswith("<|im_start|>assistant\n")
    assert got.ids == tokenizer.encode(text, add_special_tokens=False).ids
    assert got.ids[0] == tokenizer.token_to_id("<|im_start|>")  # a special token, kept whole
    raw = prepare_prompt(path, "the cat", raw=True)
    assert not raw.chat and raw.ids == tokenizer.encode("the cat").ids


def test_model_without_template_continues_text() -> None:
    assert resolve_model(BUNDLED) == demo_model_path()
    got = prepare_prompt(demo_model_path(), "The list")
    assert not got.chat and got.shown == "The list"
    assert resolve_model(str(demo_model_path())) == demo_model_path()
