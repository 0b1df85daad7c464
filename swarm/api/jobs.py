"""From an OpenAI request to a `GenerationJob`: the prompt's ids, limits, sampling, policy.

Everything a request can get wrong is found here, before it takes a slot: an unknown model
(404), unsupported options, a chat without a template, no room for one token, a bad policy
(400). Each is an `ApiError` naming the field.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

from tokenizers import Tokenizer

from swarm.api.errors import ApiError
from swarm.api.schemas import ChatRequest, CompletionRequest, unsupported_options
from swarm.client.sampling import SamplingConfig
from swarm.errors import ConfigError
from swarm.shards import ChatTemplate
from swarm.verify.policy import parse_policy

__all__ = ["GenerationJob", "ModelFacts", "chat_job", "completion_job"]

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class ModelFacts:
    """What the gateway knows of the model it serves, for checking requests."""

    name: str  # what /v1/models lists
    model_id: str  # accepted as a name too
    tokenizer: Tokenizer
    template: ChatTemplate | None
    vocab_size: int
    max_length: int  # prompt + answer, at most
    default_max_tokens: int
    default_verify: str


@dataclass(frozen=True)
class GenerationJob:
    """One generation a request asks for, checked."""

    kind: Kind
    id: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    verify: str
    stream: bool
    include_usage: bool
    speculative: str | None = None  # None: the client's configured mode

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


def chat_job(request: ChatRequest, facts: ModelFacts) -> GenerationJob:
    """The job of a chat request (its messages rendered with the chat template)."""
    _check_common(request, facts)
    if facts.template is None:
        raise ApiError(
            400,
            f"model {facts.name} has no chat template (a base model?): use "
            "/v1/completions, or start the gateway with --chat-template FILE",
            code="no_chat_template",
            param="messages",
        )
    for i, message in enumerate(request.messages):
        extras = sorted(k for k, v in (message.model_extra or {}).items() if v is not None)
        if extras:
            raise ApiError(
                400,
                f"messages[{i}]: unsupported field(s) {', '.join(extras)}",
                code="unsupported_parameter",
                param=f"messages.{i}.{extras[0]}",
            )
    messages = [{"role": _role(m.role), "content": m.text()} for m in request.messages]
    try:
        text = facts.template.render(messages, add_generation_prompt=True)
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    # the rendered text holds the special tokens the template writes (BOS included)
    ids = list(facts.tokenizer.encode(text, add_special_tokens=False).ids)
    limit = request.max_completion_tokens
    param = "max_completion_tokens"
    if limit is None:
        limit, param = request.max_tokens, "max_tokens"
    return _job("chat", request, facts, ids, limit, param)


def completion_job(request: CompletionRequest, facts: ModelFacts) -> GenerationJob:
    """The job of a completion request."""
    _check_common(request, facts)
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(
                400,
                "several prompts in one request are not supported: send one request per prompt",
                code="unsupported_parameter",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(facts.tokenizer.encode(prompt).ids)
    else:
        ids = [int(i) for i in prompt]  # type: ignore[arg-type]
        if any(not 0 <= i < facts.vocab_size for i in ids):
            raise ApiError(400, f"token ids must be in [0, {facts.vocab_size})", param="prompt")
    return _job("completion", request, facts, ids, request.max_tokens, "max_tokens")


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _check_common(request: ChatRequest | CompletionRequest, facts: ModelFacts) -> None:
    if request.model not in (facts.name, facts.model_id):
        raise ApiError(
            404,
            f"the model {request.model!r} does not exist here; this gateway serves {facts.name!r}",
            code="model_not_found",
            param="model",
        )
    unsupported = unsupported_options(request)
    if unsupported:
        raise ApiError(
            400,
            f"unsupported option(s): {', '.join(unsupported)} (swarm does not "
            "implement them; leave them out)",
            code="unsupported_parameter",
            param=unsupported[0],
        )
    stop = request.stop_strings()
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")


def _job(
    kind: Kind,
    request: ChatRequest | CompletionRequest,
    facts: ModelFacts,
    ids: list[int],
    limit: int | None,
    param: str,
) -> GenerationJob:
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if limit is not None and limit < 1:
        raise ApiError(400, f"{param} must be at least 1, got {limit}", param=param)
    room = facts.max_length - len(ids)
    if room < 1 or (limit is not None and limit > room):
        asked = f" + {param} {limit}" if limit is not None else ""
        raise ApiError(
            400,
            f"the prompt ({len(ids)} tokens){asked} passes the model's "
            f"max_length of {facts.max_length} tokens; shorten it",
            code="context_length_exceeded",
            param=param,
        )
    max_new = limit if limit is not None else min(facts.default_max_tokens, room)
    verify = (request.swarm.verify if request.swarm else None) or facts.default_verify
    try:
        parse_policy(verify)
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="swarm.verify") from exc
    sampling = SamplingConfig(
        temperature=request.temperature, top_p=request.top_p, seed=request.seed
    )
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return GenerationJob(
        kind=kind,
        id=prefix + secrets.token_hex(12),
        prompt=tuple(ids),
        max_new_tokens=max_new,
        sampling=sampling,
        stop=request.stop_strings(),
        verify=verify,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        speculative=request.swarm.speculative if request.swarm else None,
    )
