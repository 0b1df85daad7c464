"""`GenerationResponse`: one generation run as one ASGI response, streamed or not.

The endpoint checks the request cheaply and takes an admission ticket; this response then
renders and tokenizes the prompt in a worker thread (`Gateway.prepare`), waits for a slot,
runs the generation in the response's own task and answers: JSON, or
server-sent events (``data: {chunk}`` lines ending ``data: [DONE]``). Nothing is sent until
the first token exists, so a failure before it (no route, a queue timeout) is still a
proper HTTP error; a failure after it ends the stream with an error event. A task watches
the connection meanwhile: when the client goes away the generation is cancelled at once,
which closes its swarm sessions (servers free their caches) and counts it in
``swarm_api_cancelled_generations``. A client that stops reading
is a client gone: the HTTP server closes a connection whose send stalls past its deadline,
or whose sends for this answer waited past the send budget in all (a reader that trickles
just fast enough to dodge the deadline; `swarm.api.http`), which this response sees as a
disconnect. The ticket is released
whatever happens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from starlette.responses import Response

from swarm.api.admission import Ticket
from swarm.api.errors import ApiError, error_from_exception
from swarm.api.gateway import Gateway
from swarm.api.jobs import GenerationJob
from swarm.api.receipts import receipt_digest
from swarm.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    FinishReason,
    ResponseMessage,
    SwarmDetection,
    SwarmHop,
    SwarmReport,
    Usage,
    dump,
)
from swarm.client.generation import AnswerText, Event
from swarm.client.model import GenerationResult, TokenStream
from swarm.errors import unwrap_group

__all__ = ["GenerationResponse"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class GenerationResponse(Response):
    """The answer to a checked generation request (see the module docstring)."""

    def __init__(
        self,
        gateway: Gateway,
        prepare: Callable[[], GenerationJob],
        ticket: Ticket,
        *,
        owner: str | None = None,
    ) -> None:
        super().__init__(status_code=200)
        self.gateway = gateway
        self.prepare = prepare  # CPU work: run in a worker thread
        self.job: GenerationJob
        self.ticket = ticket
        self.owner = owner  # the key fingerprint the receipts are kept for
        self.created = int(time.time())
        self.name = gateway.facts.name
        self._answer_text: AnswerText  # set once the job is prepared
        self._started = False
        self._client_left = False
        self._send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_on_disconnect, receive, nursery.cancel_scope)
                await self._answer()
                nursery.cancel_scope.cancel()
        finally:
            self.ticket.release()

    async def _cancel_on_disconnect(self, receive: Receive, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the client disconnects (the request body was read already)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_left = True
                scope.cancel()
                return

    async def _answer(self) -> None:
        try:
            self.job = job = await self.gateway.prepare(self.prepare)
        except Exception as raised:
            error = error_from_exception(raised)
            await self._send_json(error.status, error.body(), error.headers)
            return
        # tokens stream as they come only where no check can roll them back
        self._answer_text = AnswerText(hold=job.verify != "none")
        try:
            async with self.ticket:
                stream = self.gateway.model.stream(
                    list(job.prompt),
                    job.max_new_tokens,
                    job.sampling,
                    job.stop,
                    verify=job.verify,
                    speculative=job.speculative,
                )
                ended = False
                try:
                    async with stream as events:
                        async for event in events:
                            if job.stream:
                                await self._stream_event(event)
                    ended = True
                finally:
                    if not ended and self._client_left:  # cancelled by the watcher
                        self.gateway.metrics.cancelled.inc()
            report = self._finish(events)
        except Exception as raised:
            error = error_from_exception(unwrap_group(raised))
            await self._send_error(error)
            return
        result = events.result
        self.gateway.metrics.generated(result.ttft, result.timings[1:])
        if job.stream:
            await self._stream_end(result, report)
        else:
            await self._send_json(200, self._whole(result, report))

    # ---- the answer's parts ----

    def _finish(self, tokens: TokenStream) -> SwarmReport:
        """Keep the receipts, count tokens and checks, and build the ``swarm`` object."""
        gateway, result = self.gateway, tokens.result
        gateway.receipts.put(self.job.id, tokens.receipts, self.owner)
        metrics = gateway.metrics
        metrics.tokens_in.inc(len(self.job.prompt))
        metrics.tokens_out.inc(len(result.ids))
        stats = result.verification
        if stats is not None:
            metrics.audits.inc(stats.audits)
            metrics.detections.inc(len(stats.detections))
        metrics.rollbacks.inc(result.rollbacks)
        return SwarmReport(
            route=[SwarmHop(**hop) for hop in result.route],
            policy=stats.policy if stats is not None else self.job.verify,
            audits=stats.audits if stats is not None else 0,
            reruns=stats.reruns if stats is not None else 0,
            detections=[SwarmDetection(peer=p, step=s) for p, s in stats.detections]
            if stats is not None
            else [],
            rollbacks=result.rollbacks,
            recoveries=result.recoveries,
            rounds=result.rounds,
            receipts=[receipt_digest(r) for r in tokens.receipts],
            receipts_url=f"/v1/swarm/receipts/{self.job.id}",
        )

    def _usage(self, result: GenerationResult) -> Usage:
        prompt, completion = len(self.job.prompt), len(result.ids)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _whole(self, result: GenerationResult, report: SwarmReport) -> dict[str, Any]:
        text, reason, usage = result.text or "", _finish_reason(result), self._usage(result)
        job_id, created, name = self.job.id, self.created, self.name
        if self.job.kind == "chat":
            choice = ChatChoice(message=ResponseMessage(content=text), finish_reason=reason)
            return dump(
                ChatCompletion(
                    id=job_id,
                    created=created,
                    model=name,
                    choices=[choice],
                    usage=usage,
                    swarm=report,
                )
            )
        done = CompletionChoice(text=text, finish_reason=reason)
        return dump(
            Completion(
                id=job_id, created=created, model=name, choices=[done], usage=usage, swarm=report
            )
        )

    # ---- streaming ----

    async def _start_stream(self) -> None:
        if self._started:
            return
        self._started = True
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await self._emit({"type": "http.response.start", "status": 200, "headers": headers})
        if self.job.kind == "chat":
            await self._event(self._chat_chunk(Delta(role="assistant", content="")))

    async def _stream_event(self, event: Event) -> None:
        """Stream the answer's text as the events make it. Server-sent events cannot take
        text back, so under a policy that may roll tokens back the text waits for `Done`:
        the streamed text is always the final text (`AnswerText`)."""
        await self._start_stream()
        _, piece = self._answer_text.push(event)
        if piece:
            await self._event(self._piece(piece))

    async def _stream_end(self, result: GenerationResult, report: SwarmReport) -> None:
        await self._start_stream()
        reason = _finish_reason(result)
        usage = self._usage(result)
        last = self._piece("", reason)
        if self.job.include_usage:
            await self._event(last)
            last = self._usage_chunk(usage)
        await self._event(last | {"swarm": dump(report)})
        await self._send_bytes(b"data: [DONE]\n\n", more=False)

    def _piece(self, text: str, reason: FinishReason | None = None) -> dict[str, Any]:
        if self.job.kind == "chat":
            delta = Delta(content=text) if text else Delta()
            return self._chat_chunk(delta, reason)
        chunk = Completion(
            id=self.job.id,
            created=self.created,
            model=self.name,
            choices=[CompletionChoice(text=text, finish_reason=reason)],
        )
        return dump(chunk)

    def _chat_chunk(self, delta: Delta, reason: FinishReason | None = None) -> dict[str, Any]:
        choice = ChatChunkChoice(delta=delta, finish_reason=reason)
        chunk = ChatCompletionChunk(
            id=self.job.id, created=self.created, model=self.name, choices=[choice]
        )
        return dump(chunk)

    def _usage_chunk(self, usage: Usage) -> dict[str, Any]:
        if self.job.kind == "chat":
            return dump(
                ChatCompletionChunk(
                    id=self.job.id, created=self.created, model=self.name, choices=[], usage=usage
                )
            )
        return dump(
            Completion(
                id=self.job.id, created=self.created, model=self.name, choices=[], usage=usage
            )
        )

    async def _event(self, data: dict[str, Any]) -> None:
        await self._send_bytes(b"data: " + json.dumps(data).encode() + b"\n\n")

    async def _send_bytes(self, data: bytes, more: bool = True) -> None:
        await self._emit({"type": "http.response.body", "body": data, "more_body": more})

    async def _emit(self, message: Message) -> None:
        assert self._send is not None  # set by __call__ before anything is sent
        await self._send(message)

    async def _send_error(self, error: ApiError) -> None:
        if not self._started:
            await self._send_json(error.status, error.body(), error.headers)
            return
        await self._event(error.body())
        await self._send_bytes(b"data: [DONE]\n\n", more=False)

    async def _send_json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await self._emit({"type": "http.response.start", "status": status, "headers": raw})
        await self._send_bytes(data, more=False)


def _finish_reason(result: GenerationResult) -> FinishReason:
    return "length" if result.stop_reason == "length" else "stop"
