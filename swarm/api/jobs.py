"""From an OpenAI request to a `GenerationJob`: the prompt's ids, limits, sampling, policy.

Everything a request can get wrong is found here: an unknown model (404), unsupported
options, a chat without a template, no room for one token, a bad policy or a policy past the
gateway's caps (400). Each is an `ApiError` naming the field.

Two stages, so that untrusted text costs the event loop nothing: `check_request` is cheap
(no rendering, no tokenizing; a prompt whose characters cannot fit the model's length in
tokens is refused by counting them) and runs before the request is admitted;
`chat_job` / `completion_job` render and tokenize, and the gateway runs them in a worker
thread after admission (`Gateway.prepare`). Tokenizing goes through ``encode_batch``, which
releases the GIL (``encode`` holds it for the whole call: 1 s for 256 KiB of one word).
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
from swarm.verify.policy import PolicyKind, parse_policy

__all__ = [
    "GenerationJob",
    "ModelFacts",
    "chat_job",
    "check_request",
    "completion_job",
    "longest_token",
]

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
    max_redundancy: int = 3  # the largest K of "redundant:K" a request may ask
    token_chars: int = 64  # no token spans more characters than this (`longest_token`)

    @property
    def max_prompt_chars(self) -> int:
        """Text longer than this cannot fit ``max_length`` tokens (twice the bound, for
        normalizers that merge characters)."""
        return 2 * self.token_chars * self.max_length


def longest_token(tokenizer: Tokenizer) -> int:
    """The most characters one token of ``tokenizer`` stands for (its vocabulary's longest
    entry, added tokens included): a text of n characters needs at least n / this tokens."""
    return max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)


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


def check_request(request: ChatRequest | CompletionRequest, facts: ModelFacts) -> None:
    """The checks that cost no rendering or tokenizing (run before admission)."""
    _check_common(request, facts)
    if isinstance(request, ChatRequest):
        if facts.template is None:
            raise ApiError(
                400,
                f"model {facts.name} has no chat template (a base model?): "
                "use /v1/completions, or start the gateway with --chat-template "
                "FILE",
                code="no_chat_template",
                param="messages",
            )
        chars, param = sum(len(m.text()) for m in request.messages), "messages"
    elif isinstance(request.prompt, str):
        chars, param = len(request.prompt), "prompt"
    else:
        chars = sum(len(p) for p in request.prompt if isinstance(p, str))
        chars, param = max(chars, len(request.prompt)), "prompt"
    if chars > facts.max_prompt_chars:
        raise ApiError(
            400,
            f"the prompt ({chars} characters) cannot fit the model's "
            f"max_length of {facts.max_length} tokens; shorten it",
            code="context_length_exceeded",
            param=param,
        )
    _check_policy(request, facts)


def chat_job(request: ChatRequest, facts: ModelFacts) -> GenerationJob:
    """The job of a chat request (its messages rendered with the chat template).

    CPU work (rendering, tokenizing): run it in a worker thread."""
    check_request(request, facts)
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
    ids = _encode(facts, text, add_special_tokens=False)
    limit = request.max_completion_tokens
    param = "max_completion_tokens"
    if limit is None:
        limit, param = request.max_tokens, "max_tokens"
    return _job("chat", request, facts, ids, limit, param)


def completion_job(request: CompletionRequest, facts: ModelFacts) -> GenerationJob:
    """The job of a completion request (CPU work: run it in a worker thread)."""
    check_request(request, facts)
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
        ids = _encode(facts, prompt, add_special_tokens=True)
    else:
        ids = [int(i) for i in prompt]  # type: ignore[arg-type]
        if any(not 0 <= i < facts.vocab_size for i in ids):
            raise ApiError(400, f"token ids must be in [0, {facts.vocab_size})", param="prompt")
    return _job("completion", request, facts, ids, request.max_tokens, "max_tokens")


def _encode(facts: ModelFacts, text: str, *, add_special_tokens: bool) -> list[int]:
    # encode_batch releases the GIL while it works; encode holds it throughout
    (encoding,) = facts.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
    return list(encoding.ids)


def _check_policy(request: ChatRequest | CompletionRequest, facts: ModelFacts) -> None:
    verify = (request.swarm.verify if request.swarm else None) or facts.default_verify
    try:
        policy = parse_policy(verify)
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="swarm.verify") from exc
    # what the policy costs the servers per step, at most: K runs, or one re-run
    runs = {PolicyKind.REDUNDANT: policy.replicas, PolicyKind.SPOT_CHECK: 2}.get(policy.kind, 1)
    if runs > facts.max_redundancy:
        raise ApiError(
            400,
            f"swarm.verify: {policy} runs each step up to {runs} times; this "
            f"gateway allows at most {facts.max_redundancy} (redundant:"
            f"{facts.max_redundancy})",
            code="policy_not_allowed",
            param="swarm.verify",
        )


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
        sampling = SamplingConfig(
            temperature=request.temperature, top_p=request.top_p, seed=request.seed
        )
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="seed") from exc
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
