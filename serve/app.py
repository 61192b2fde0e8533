"""The HTTP server: answers with checked steps and latency, OpenAI-compatible chat, health, metrics, a page.

    NESTLING_MODEL_DIR=runs/default/exports/tiny uvicorn --factory nestling.serve.app:create_app
    app = create_app(Settings(model_dir=...))          # or create_app(settings, reasoner=r) in tests

Endpoints (one router module each in serve/routers/): POST /v1/answer, POST /v1/chat/completions (+ SSE),
GET /v1/models, GET /health, GET /metrics, GET / (the page). The model loads in the background at startup
(/health says 503 until it is ready). The reasoner's engines answer that many requests at once; others wait
in arrival order (serve.slots): up to ``max_queue`` admitted, a wait over ``queue_timeout_s`` gets 503, more
get 429. Every error is JSON: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from nestling.serve.routers import answer, openai, ops, page
from nestling.serve.routers.common import error_response
from nestling.serve.runtime import Reasoner
from nestling.serve.settings import Settings, load_settings
from nestling.serve.slots import ModelState
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nestling.core.errors import ApiError, NestlingError

log = logging.getLogger(__name__)

ENDPOINTS = ("/", "/health", "/metrics", "/v1/answer", "/v1/chat/completions", "/v1/models")


class LimitsAndMetrics:
    """Pure ASGI: bodies over the limit get 413 (by Content-Length or counted); every request is timed."""

    def __init__(self, app: ASGIApp, state: ModelState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        status = 500

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            limit = self.state.settings.max_body_bytes
            length = dict(scope.get("headers") or []).get(b"content-length")
            too_big = length is not None and (not length.isdigit() or int(length) > limit)
            body = b""
            if not too_big:
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    body += message.get("body", b"")
                    if len(body) > limit:
                        too_big = True
                        break
                    if not message.get("more_body", False):
                        break
            if too_big:
                msg = f"request body over {limit} bytes; send a shorter question"
                await error_response(413, msg, "request_too_large")(scope, receive, send_wrapped)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # then the real stream: http.disconnect reaches streaming responses

            await self.app(scope, replay, send_wrapped)
        finally:
            self.state.metrics.request(endpoint, status, time.perf_counter() - t0)


def _default_loader(s: Settings) -> Reasoner:
    return Reasoner.load(
        s.model_dir or "", s.engine, s.variant, n_threads=s.threads, pool=s.pool, batched=s.batched
    )


def create_app(
    settings: Settings | None = None,
    *,
    reasoner: Reasoner | None = None,
    loader: Callable[[Settings], Reasoner] | None = None,
    on_load_failed: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The server. ``reasoner``: serve this one (the caller closes it); else ``loader(settings)`` (default:
    ``Reasoner.load(settings.model_dir, ...)``) runs in the background at startup and the app closes it."""
    settings = settings or load_settings()
    if reasoner is None and loader is None and not settings.model_dir:
        raise NestlingError("no model to serve: pass DIR or set NESTLING_MODEL_DIR to an export directory")
    state = ModelState(settings, reasoner)
    app = FastAPI(
        title="nestling",
        version="0.1.0",
        description="A distilled reasoner: answers with checked steps and latency.",
        lifespan=_lifespan(state, reasoner, loader or _default_loader, on_load_failed),
    )
    app.state.model = state
    app.state.settings = settings
    _add_error_handlers(app)
    for module in (answer, openai, ops, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    app.add_middleware(LimitsAndMetrics, state=state)
    return app


def _lifespan(
    state: ModelState,
    reasoner: Reasoner | None,
    load: Callable[[Settings], Reasoner],
    on_load_failed: Callable[[BaseException], None] | None,
) -> Callable[[FastAPI], AsyncIterator[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The queue's asyncio objects must belong to the serving loop: made here.
        if reasoner is not None:
            state.ready(reasoner)
            yield
            return

        async def load_in_background() -> None:
            try:
                r = await asyncio.to_thread(load, state.settings)
                state.ready(r)
                log.info("model ready: %s (%s, %d engines)", state.model_name, r.variant, r.pool)
            except Exception as e:
                state.status, state.error = "failed", str(e)
                log.error("model failed to load: %s", e)
                if on_load_failed is not None:
                    on_load_failed(e)

        task = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            if not task.done():
                await asyncio.wait([task])  # a load thread cannot be interrupted; let it finish
            if state.reasoner is not None:
                state.reasoner.close()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "request body is not valid JSON", "invalid_request_error")
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        resp = error_response(422, f"{where}: {first.get('msg')}", "invalid_request_error")
        details = [
            {"loc": [str(x) for x in err.get("loc", ())], "msg": str(err.get("msg"))} for err in errors[:10]
        ]
        body = json.loads(resp.body)
        body["error"]["details"] = details
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "http_error", dict(e.headers or {}))

    @app.exception_handler(NestlingError)
    async def _nestling(request: Request, e: NestlingError) -> JSONResponse:
        return error_response(422, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal error; see the server log", "server_error")
