"""Request and response bodies of the OpenAI-compatible endpoints (pydantic models).

Requests accept OpenAI's fields; fields swarm does not implement are not ignored:
`unsupported_options` names every one a request set to something other than its neutral
value (``n: 2``, ``tools``, ``logprobs: true``...), and the gateway answers 400 naming it.
The ``swarm`` field is ours: ``{"verify": "spot-check:0.2"}`` picks the request's policy.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class _Sampling(BaseModel):
    """Fields both generation endpoints share."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    swarm: SwarmOptions | None = None

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
