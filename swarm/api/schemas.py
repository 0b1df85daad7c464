"""Request and response bodies of the OpenAI-compatible endpoints (pydantic models).

Requests accept OpenAI's fields; fields swarm does not implement are not ignored:
`unsupported_options` names every one a request set to something other than its neutral
value (``n: 2``, ``tools``, ``logprobs: true``...), and the gateway answers 400 naming it.
The ``swarm`` field is ours: ``{"verify": "spot-check:0.2"}`` picks the request's policy.

Every request body is checked whole before its fields are: no string anywhere in it may hold
a lone surrogate (JSON's ``"\\ud800"`` decodes to one, and no tokenizer or encoder accepts
it), and integers are 64-bit (``seed`` is a signed or unsigned 64-bit value, as generators
take it). Each failure is a 400 naming the field, never a 500 from deep inside.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "CompletionRequest",
    "FinishReason",
    "ModelCard",
    "ModelList",
    "SwarmOptions",
    "SwarmReport",
    "Usage",
    "unsupported_options",
]

FinishReason = Literal["stop", "length"]

# Options OpenAI defines that swarm does not do, with the values that ask for nothing.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "suffix": ("",),
}
# Harmless metadata OpenAI clients may send; accepted and not used.
_ACCEPTED_EXTRAS = frozenset({"user", "metadata", "store", "service_tier"})


def unsupported_options(request: BaseModel) -> list[str]:
    """Names of the options a request set that swarm does not implement, sorted."""
    out = []
    for name, value in (request.model_extra or {}).items():
        if value is None or name in _ACCEPTED_EXTRAS:
            continue
        if name in _NEUTRAL and value in _NEUTRAL[name]:
            continue
        out.append(name)
    return sorted(out)


class SwarmOptions(BaseModel):
    """The request's ``swarm`` object."""

    model_config = ConfigDict(extra="forbid")
    verify: str | None = Field(None, description="none, spot-check:P, redundant:K or optimistic")
    speculative: Literal["auto", "off", "ngram"] | None = Field(
        None,
        description="guessed tokens per round trip (the tokens are those of plain decoding); "
        "default: the gateway's --speculative",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a 64-bit generator seed can hold
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_MAX_DEPTH = 32


def check_json_value(value: Any, where: str = "body", depth: int = 0) -> None:
    """Raise `ValueError` naming the place of the first lone surrogate, out-of-range integer
    or too deep nesting in a decoded JSON value."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{where}: not valid Unicode text (a lone surrogate at character {exc.start})"
            ) from None
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"{where}: the integer is out of the 64-bit range")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json_value(key, where, depth + 1)
            check_json_value(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}.{i}", depth + 1)


class _Sampling(BaseModel):
    """Fields both generation endpoints share."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    swarm: SwarmOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_json_text(cls, data: Any) -> Any:
        check_json_value(data)
        return data

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; ``content`` is text or a list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is text, one text in a list, or token ids."""

    prompt: str | list[str] | list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SwarmHop(BaseModel):
    peer: str
    host: str
    port: int
    start: int
    stop: int


class SwarmDetection(BaseModel):
    peer: str
    step: int


class SwarmReport(BaseModel):
    """How the answer was computed and checked: the ``swarm`` object of every answer."""

    route: list[SwarmHop]
    policy: str
    audits: int
    reruns: int
    detections: list[SwarmDetection]
    rollbacks: int
    recoveries: int
    rounds: int = Field(
        0, description="steps through the chain: fewer than the tokens where guesses held"
    )
    receipts: list[str] = Field(description="hex SHA-256 of each signed step receipt")
    receipts_url: str
    # streaming only: the final text, when a verification rollback changed text already sent
    rewritten_text: str | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    swarm: SwarmReport


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    swarm: SwarmReport | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A completion, and (``object`` the same, as OpenAI does) each streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    swarm: SwarmReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "swarm"
    swarm_model_id: str
    num_layers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    """A response body as JSON-ready data (unset optional fields left out)."""
    return model.model_dump(exclude_none=True)
