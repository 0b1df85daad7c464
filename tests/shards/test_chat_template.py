"""Chat templates: found where transformers puts them, rendered as transformers renders them,
in a sandbox."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from swarm.errors import ConfigError, ShardError
from swarm.shards import ChatTemplate, load_chat_template
from swarm.shards.bundled import demo_model_path
from swarm.testing.checkpoints import GGUF_CHAT_TEMPLATE, write_random_gguf

# Llama 3's shape: BOS written by the template, a system message folded in, header tokens.
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
STRICT = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}{{ '[' + message['role'] + '] ' + message['content'] | tojson + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "  Capital of Japan? 東京? "},
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": "And of Italy?"},
    ],
]


def _folder(tmp_path: Path, template: str, *, jinja_file: bool = False) -> Path:
    """The demo model's tokenizer files plus ``template`` (in tokenizer_config.json, or in
    chat_template.jinja beside it)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(demo_model_path() / name, folder / name)
    if jinja_file:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("template", [LLAMA3_LIKE, STRICT, GGUF_CHAT_TEMPLATE])
@pytest.mark.parametrize("jinja_file", [False, True])
def test_renders_like_transformers(template: str, jinja_file: bool, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, template, jinja_file=jinja_file)
    ours = load_chat_template(folder)
    assert ours is not None and ours.bos_token == ours.eos_token == "<|endoftext|>"
    theirs = AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS[:1] if template == STRICT else CONVERSATIONS:
        for prompt in (True, False):
            expected = theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert ours.render(messages, add_generation_prompt=prompt) == expected


def test_jinja_file_wins_over_tokenizer_config(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "{{ 'from config' }}")
    (folder / "chat_template.jinja").write_text("{{ 'from jinja file' }}")
    template = load_chat_template(folder)
    assert template is not None and template.render([]) == "from jinja file"


def test_named_templates_pick_the_default(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unused")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages | length }} messages"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = load_chat_template(folder)
    assert template is not None and template.render(CONVERSATIONS[1]) == "4 messages"


def test_no_template_is_none(tmp_path: Path) -> None:
    assert load_chat_template(demo_model_path()) is None
    assert load_chat_template(tmp_path) is None


def test_refusals_and_sandbox() -> None:
    strict = ChatTemplate(STRICT)
    assistant_first = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(ConfigError, match="roles must alternate"):
        strict.render(assistant_first)
    # Python internals are out of reach and inputs cannot be changed
    with pytest.raises(ConfigError, match=r"sandbox forbids.*__class__"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])
    with pytest.raises(ConfigError, match="sandbox forbids"):
        ChatTemplate("{% set _ = messages.append(1) %}").render([])
    with pytest.raises(ShardError, match="not valid Jinja"):
        ChatTemplate("{% for %}").render([])


def test_gguf_template_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_random_gguf(tmp_path / "tiny.gguf", num_layers=1)
    ours = load_chat_template(path)
    assert ours is not None and ours.source == GGUF_CHAT_TEMPLATE
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages) == expected
