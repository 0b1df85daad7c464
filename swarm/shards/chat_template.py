"""Chat templates: where a checkpoint keeps its template, and rendering it as transformers does.

A chat template is a Jinja program that turns ``[{"role": "user", "content": "..."}]`` into
the prompt text the model was trained on. :func:`load_chat_template` finds it in a GGUF file's
``tokenizer.chat_template``, a folder's ``chat_template.jinja`` (newer transformers save it
there) or the ``chat_template`` of ``tokenizer_config.json``. :meth:`ChatTemplate.render`
runs it in Jinja's ``ImmutableSandboxedEnvironment`` with what ``transformers``'
``apply_chat_template`` provides (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``, a ``tojson`` that keeps non-ASCII text, ``strftime_now``,
the ``loopcontrols`` extension and ``{% generation %}`` blocks), so the same messages give the
same text. Templates come with downloaded checkpoints and are untrusted code: the sandbox
forbids attribute access to Python internals and the template cannot change its inputs.

The rendered text already holds the special tokens the template writes (BOS included, where
it writes one): encode it without adding special tokens again.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.errors import ConfigError, ShardError
from swarm.shards.gguf import gguf_metadata
from swarm.shards.gguf_header import is_gguf

__all__ = ["ChatTemplate", "load_chat_template"]

Message = Mapping[str, Any]


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template (Jinja ``source``) and the special tokens it may use."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (each ``{"role": ..., "content": ...}``); with
        ``add_generation_prompt`` it ends where the assistant's answer begins.

        Raises:
            ConfigError: the template refuses the conversation (``raise_exception``, e.g.
                roles that do not alternate), fails on it, or reaches for what the sandbox
                forbids (Python internals, changing its inputs).
            ShardError: the template is not valid Jinja.
        """
        import jinja2

        template = _compile(self.source)
        try:
            return str(
                template.render(
                    messages=[dict(m) for m in messages],
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except jinja2.exceptions.SecurityError as exc:
            raise ConfigError(f"the chat template did what the sandbox forbids: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ConfigError(f"the chat template refused the conversation: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"the chat template failed on the conversation: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} marks; rendered as is
        tags = {"generation"}  # noqa: RUF012  (jinja2 declares it so)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render")
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: object,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ShardError(f"the checkpoint's chat template is not valid Jinja: {exc}") from exc


def load_chat_template(path: str | Path) -> ChatTemplate | None:
    """The chat template of the checkpoint at ``path`` (a GGUF file or a Hugging Face folder),
    or None when it has none (a base model).

    Raises:
        ShardError: a file that should hold the template cannot be read or parsed.
    """
    if is_gguf(path):
        return _from_gguf(path)
    folder = Path(path)
    config = _read_json(folder / "tokenizer_config.json")
    jinja_file = folder / "chat_template.jinja"
    source: object = None
    if jinja_file.is_file():
        try:
            source = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ShardError(f"cannot read {jinja_file}: {exc}") from exc
    else:
        source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        named = {str(t.get("name")): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    return ChatTemplate(
        source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    )


def _from_gguf(path: str | Path) -> ChatTemplate | None:
    meta = gguf_metadata(path, arrays=("tokenizer.ggml.tokens",))
    source = meta.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source:
        return None
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])

    def token(name: str) -> str:
        index = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    return ChatTemplate(source, token("bos"), token("eos"))


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"cannot read {file}: {exc}") from exc
    return raw if isinstance(raw, dict) else {}


def _token_text(value: object) -> str:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
