"""`create_app`: the FastAPI application of the gateway (routes and error handlers).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(OpenAI's shapes, streamed as server-sent events with ``"stream": true``), ``GET /health``,
``GET /metrics``, ``GET /v1/swarm/receipts/{id}``, ``GET /v1/swarm/status`` and the status
page at ``/``; OpenAPI docs at ``/docs``. Every error is OpenAI's error body (see
`swarm.api.errors`); the app never answers with a traceback.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarm import __version__
from swarm.api.errors import ApiError, error_body, error_from_exception
from swarm.api.gateway import Gateway
from swarm.api.jobs import chat_job, check_request, completion_job
from swarm.api.middleware import GuardMiddleware
from swarm.api.receipts import receipt_json
from swarm.api.responses import GenerationResponse
from swarm.api.schemas import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    dump,
)
from swarm.api.status import health_report, status_report
from swarm.net.transport import host_key

__all__ = ["create_app"]

_HERE = Path(__file__).parent
_PAGES = Environment(
    loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(["html"])
)


def create_app(gateway: Gateway) -> Any:
    """The ASGI application serving ``gateway`` (FastAPI inside `GuardMiddleware`)."""
    app = FastAPI(
        title="swarm gateway",
        version=__version__,
        description="An OpenAI-compatible API in front of a swarm.",
    )
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    _add_openai_routes(app, gateway)
    _add_swarm_routes(app, gateway)
    config = gateway.config
    return GuardMiddleware(
        app,
        api_keys=config.api_keys,
        max_body_bytes=config.max_body_bytes,
        metrics=gateway.metrics,
        body_timeout_s=config.body_timeout_s,
        allowed_hosts=config.allowed_hosts,
    )


def _key(request: Request) -> str | None:
    """The fingerprint of the API key the request came with (None without keys)."""
    key = request.scope.get("state", {}).get("swarm_key")
    return key if isinstance(key, str) else None


def _groups(request: Request) -> tuple[str, ...]:
    """What the request counts against in admission: its client's host and its key."""
    host = request.client.host if request.client else "?"
    key = _key(request)
    return (f"host:{host_key(host)}",) + ((f"key:{key}",) if key else ())


def _json_error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _json_error(ApiError(400, "the body is not valid JSON", code="invalid_json"))
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return _json_error(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        text = exc.detail if isinstance(exc.detail, str) else "error"
        body = error_body(f"{request.url.path}: {text}", "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _json_error(error_from_exception(exc))


def _add_openai_routes(app: FastAPI, gateway: Gateway) -> None:
    facts = gateway.facts

    def card() -> ModelCard:
        return ModelCard(
            id=facts.name,
            created=int(gateway.started),
            swarm_model_id=facts.model_id,
            num_layers=gateway.num_layers,
        )

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        return dump(ModelList(data=[card()]))

    @app.get("/v1/models/{name:path}", response_model=ModelCard)
    async def get_model(name: str) -> dict[str, Any]:
        if name not in (facts.name, facts.model_id):
            raise ApiError(
                404,
                f"the model {name!r} does not exist here",
                code="model_not_found",
                param="model",
            )
        return dump(card())

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        """A chat completion (``"stream": true`` for server-sent events)."""
        check_request(body, facts)  # cheap; rendering and tokenizing wait for admission
        ticket = gateway.admission.reserve(_groups(request))
        return GenerationResponse(
            gateway, functools.partial(chat_job, body, facts), ticket, owner=_key(request)
        )

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """A text completion (``"stream": true`` for server-sent events)."""
        check_request(body, facts)
        ticket = gateway.admission.reserve(_groups(request))
        return GenerationResponse(
            gateway, functools.partial(completion_job, body, facts), ticket, owner=_key(request)
        )


def _add_swarm_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when online servers cover every block; 503 with the missing blocks."""
        status, body = health_report(gateway)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/swarm/receipts/{completion_id}")
    async def receipts(completion_id: str, request: Request) -> dict[str, Any]:
        """The signed step receipts of a recent completion (only for the key that made it)."""
        found = gateway.receipts.get(completion_id, owner=_key(request))
        if found is None:
            raise ApiError(
                404,
                f"no receipts for {completion_id!r} (unknown, or forgotten: "
                f"the gateway keeps the last {gateway.config.receipts_keep} for "
                f"{gateway.config.receipts_ttl_s:g} s)",
                code="not_found",
            )
        return {
            "id": completion_id,
            "object": "swarm.receipts",
            "receipts": [receipt_json(r) for r in found],
        }

    @app.get("/v1/swarm/status")
    async def status() -> dict[str, Any]:
        """The status page's data."""
        return status_report(gateway)

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request, partial: bool = False) -> HTMLResponse:
        """The status page (``?partial=1``: only the part that refreshes)."""
        data = status_report(gateway)
        name = "status_main.html" if partial else "status.html"
        html = _PAGES.get_template(name).render(
            data=data,
            key=request.query_params.get("key", ""),
            now=time.strftime("%H:%M:%S"),
        )
        return HTMLResponse(html)
