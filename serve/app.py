"""The HTTP server: answers with checked steps and latency, OpenAI-compatible chat, health, metrics, a page.

    NESTLING_MODEL_DIR=runs/default/exports/tiny uvicorn --factory serve.app:create_app
    app = create_app(Settings(model_dir=...))          # or create_app(settings, reasoner=r) in tests

Endpoints: POST /v1/answer, POST /v1/chat/completions (+ SSE), GET /v1/models, GET /health, GET /metrics,
GET / (the page). The model loads in the background at startup (/health says 503 until it is ready); one
engine answers one request at a time, at most ``max_queue`` requests are admitted (more: 429) and a request
that waits longer than ``queue_timeout_s`` gets 503. Every error is JSON: ``{"error": {"message", "type",
"code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nestling.serve.errors import NestlingError
from nestling.serve.runtime import Answer, Reasoner
from nestling.serve.settings import Settings, load_settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/", "/health", "/metrics", "/v1/answer", "/v1/chat/completions", "/v1/models")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with this status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}


def error_response(
    status: int, message: str, type_: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- metrics (Prometheus text format, written by hand: no extra dependency) --------------------------------

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(_BUCKETS)
        self.total = 0.0
        self.n = 0

    def observe(self, x: float) -> None:
        for i, b in enumerate(_BUCKETS):
            if x <= b:
                self.counts[i] += 1
        self.total += x
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(_BUCKETS, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        braces = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{braces} {self.total:.6f}", f"{name}_count{braces} {self.n}"]


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    durations: dict[str, Histogram] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=Histogram)
    generation: Histogram = field(default_factory=Histogram)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.durations.setdefault(endpoint, Histogram()).observe(seconds)

    def answered(self, a: Answer) -> None:
        with self.lock:
            self.ttft.observe(a.latency.ttft_s)
            self.generation.observe(a.latency.total_s)
            self.prompt_tokens += a.latency.prompt_tokens
            self.completion_tokens += a.latency.completion_tokens

    def render(self, queue_depth: int, ready: bool) -> str:
        def block(name: str, kind: str, help_: str, lines: list[str]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines]

        with self.lock:
            req = [
                f'nestling_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in self.requests.items()
            ]
            err = [
                f'nestling_errors_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in self.requests.items()
                if s >= 400
            ]
            dur = [
                line
                for e, h in self.durations.items()
                for line in h.lines("nestling_request_seconds", f'endpoint="{e}"')
            ]
            table = [
                ("requests_total", "counter", "HTTP requests by endpoint and status.", req),
                ("errors_total", "counter", "HTTP responses with status >= 400.", err),
                ("request_seconds", "histogram", "Request latency, first byte in to last byte out.", dur),
                ("ttft_seconds", "histogram", "Time to first generated token.",
                 self.ttft.lines("nestling_ttft_seconds")),
                ("generation_seconds", "histogram", "Generation time per answer.",
                 self.generation.lines("nestling_generation_seconds")),
                ("prompt_tokens_total", "counter", "Prompt tokens processed.",
                 [f"nestling_prompt_tokens_total {self.prompt_tokens}"]),
                ("completion_tokens_total", "counter", "Tokens generated.",
                 [f"nestling_completion_tokens_total {self.completion_tokens}"]),
                ("queue_depth", "gauge", "Requests admitted (running + waiting).",
                 [f"nestling_queue_depth {queue_depth}"]),
                ("model_ready", "gauge", "1 once the model is loaded.",
                 [f"nestling_model_ready {int(ready)}"]),
            ]  # fmt: skip
            out = [
                line
                for name, kind, help_, lines in table
                for line in block(f"nestling_{name}", kind, help_, lines)
            ]
        return "\n".join(out) + "\n"


# ---- the model and its queue -------------------------------------------------------------------------------


class ModelState:
    """The reasoner, its load status and the admission queue in front of it (event-loop side only)."""

    def __init__(self, settings: Settings, reasoner: Reasoner | None):
        self.settings = settings
        self.reasoner = reasoner
        self.status: Literal["loading", "ready", "failed"] = "ready" if reasoner else "loading"
        self.error: str | None = None
        self.gate = asyncio.Lock()  # FIFO: the order requests are served in
        self.admitted = 0
        self.metrics = Metrics()
        self.created = int(time.time())

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        if self.reasoner is not None:
            return self.reasoner.name
        return Path(self.settings.model_dir or "nestling").name

    async def admit(self) -> Reasoner:
        """Wait for the engine; 503 while loading or after the wait limit, 429 when the queue is full."""
        if self.status != "ready" or self.reasoner is None:
            detail = (
                "model is loading; retry shortly"
                if self.status == "loading"
                else f"model failed: {self.error}"
            )
            raise ApiError(503, detail, "model_not_ready", {"Retry-After": "1"})
        if self.admitted >= self.settings.max_queue:
            raise ApiError(
                429,
                f"server busy: {self.admitted} requests queued (max_queue {self.settings.max_queue}); retry",
                "overloaded",
                {"Retry-After": "1"},
            )
        self.admitted += 1
        try:
            async with asyncio.timeout(self.settings.queue_timeout_s):
                await self.gate.acquire()
        except TimeoutError:
            self.admitted -= 1
            raise ApiError(
                503,
                f"waited {self.settings.queue_timeout_s:g} s for the model; the server is overloaded, retry",
                "queue_timeout",
                {"Retry-After": "1"},
            ) from None
        except BaseException:
            self.admitted -= 1
            raise
        return self.reasoner

    def release(self, *_: object) -> None:
        self.admitted -= 1
        self.gate.release()

    async def ask(self, question: str, explain: bool, max_tokens: int) -> Answer:
        r = await self.admit()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, r.ask, question, explain, max_tokens)
        # The engine is free only when the thread is done, even if this request was cancelled meanwhile.
        fut.add_done_callback(self.release)
        a = await asyncio.shield(fut)
        self.metrics.answered(a)
        return a

    async def stream(self, question: str, explain: bool, max_tokens: int) -> AsyncIterator[tuple[str, Any]]:
        """Admit first (so 429/503 are real statuses), then ("piece", str)... and ("answer", Answer)."""
        r = await self.admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): stop generating
                cancel.set()

        def work() -> None:
            try:
                s = r.stream(question, explain, max_tokens, cancel=cancel)
                for piece in s:
                    put(("piece", piece))
                put(("answer", s.answer))
            except NestlingError as e:  # the request's fault (e.g. a prompt longer than the context)
                put(("error", e))
            except Exception as e:
                log.exception("generation failed")
                put(("error", e))

        fut = loop.run_in_executor(None, work)
        fut.add_done_callback(self.release)

        async def events() -> AsyncIterator[tuple[str, Any]]:
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "answer":
                        self.metrics.answered(value)
                    yield kind, value
                    if kind != "piece":
                        return
            finally:
                cancel.set()  # the client left early: free the engine for the next request

        return events()


def stream_error(e: BaseException) -> dict[str, Any]:
    """The error event of a stream that already answered 200: the status its cause would have had."""
    if isinstance(e, NestlingError):
        return {"message": str(e), "type": "invalid_request_error", "code": 422}
    return {"message": "generation failed", "type": "server_error", "code": 500}


def get_state(request: Request) -> ModelState:
    return request.app.state.model


StateDep = Annotated[ModelState, Depends(get_state)]


_bearer = HTTPBearer(auto_error=False, description="NESTLING_API_KEY, when the server has one")


async def require_key(request: Request, _: Annotated[Any, Depends(_bearer)]) -> None:
    key = get_state(request).settings.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise ApiError(
            401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )  # fmt: skip


def resolve_limits(state: ModelState, question: str, max_tokens: int | None) -> int:
    s = state.settings
    if not question.strip():
        raise ApiError(422, "question is empty; ask something", "invalid_request_error")
    if len(question) > s.max_question_chars:
        raise ApiError(
            422, f"question has {len(question)} characters; the limit is {s.max_question_chars}",
            "invalid_request_error",
        )  # fmt: skip
    n = s.default_max_tokens if max_tokens is None else max_tokens
    if n > s.max_tokens_cap:
        raise ApiError(
            422, f"max_tokens {n} exceeds this server's cap {s.max_tokens_cap}", "invalid_request_error"
        )
    return n


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- /v1/answer --------------------------------------------------------------------------------------------


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, description="the question, in plain text")
    explain: bool = Field(True, description="steps then the answer; false: the answer only (faster)")
    max_tokens: int | None = Field(
        None, ge=1, description="generation budget; default and cap: server settings"
    )
    stream: bool = Field(False, description="server-sent events: 'token' {text}... then 'answer' {...}")


def answer_body(a: Answer, model: str) -> dict[str, Any]:
    return {**a.to_dict(), "model": model}


answer_router = APIRouter(prefix="/v1", tags=["answer"], dependencies=[Depends(require_key)])


@answer_router.post("/answer", summary="Answer a question with checked steps and latency")
async def answer(req: AnswerRequest, state: StateDep) -> Any:
    max_tokens = resolve_limits(state, req.question, req.max_tokens)
    if not req.stream:
        return answer_body(await state.ask(req.question, req.explain, max_tokens), state.model_name)
    events = await state.stream(req.question, req.explain, max_tokens)

    async def body() -> AsyncIterator[str]:
        async for kind, value in events:
            if kind == "piece":
                yield sse({"text": value}, "token")
            elif kind == "answer":
                yield sse(answer_body(value, state.model_name), "answer")
            else:
                yield sse({"error": stream_error(value)}, "error")

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


# ---- OpenAI-compatible -------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    # Clients send sampling fields (temperature, top_p, seed, ...): accepted, and ignored: decoding is greedy.
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice: decoding is greedy")
    explain: bool = Field(True, description="nestling extension: false asks for the answer only")


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(a: Answer) -> dict[str, int]:
    p, c = a.latency.prompt_tokens, a.latency.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


openai_router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_key)])


@openai_router.get("/models", summary="The served model (OpenAI-compatible)")
async def models(state: StateDep) -> dict[str, Any]:
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nestling"}
    return {"object": "list", "data": [card]}


@openai_router.post("/chat/completions", summary="Chat completion (OpenAI-compatible, greedy)")
async def chat_completions(req: ChatRequest, state: StateDep) -> Any:
    if req.model is not None and req.model != state.model_name:
        raise ApiError(
            404, f"model {req.model!r} is not served here; use {state.model_name!r}", "model_not_found"
        )
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise ApiError(
            422, "messages has no user message; send the question as role 'user'", "invalid_request_error"
        )
    question = users[-1].text()
    max_tokens = resolve_limits(state, question, req.max_completion_tokens or req.max_tokens)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": cid, "created": created, "model": state.model_name}

    if not req.stream:
        a = await state.ask(question, req.explain, max_tokens)
        message = {"role": "assistant", "content": a.text.lstrip()}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": _finish(a.finish_reason)}],
            "usage": _usage(a),
            "nestling": {"answer": a.answer, "steps": a.to_dict()["steps"], "latency": asdict(a.latency)},
        }

    events = await state.stream(question, req.explain, max_tokens)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    async def body() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        started = False
        async for kind, value in events:
            if kind == "piece":
                text = value if started else value.lstrip()  # targets open with a newline or a space
                if text:
                    started = True
                    yield chunk({"content": text})
            elif kind == "answer":
                yield chunk({}, _finish(value.finish_reason), usage=_usage(value))
                if include_usage:
                    yield sse(
                        {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)}
                    )
            else:
                yield sse({"error": stream_error(value)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


# ---- health, metrics, page ---------------------------------------------------------------------------------

ops_router = APIRouter(tags=["ops"])


@ops_router.get("/health", summary="200 when the model is ready, 503 while loading or after a failed load")
async def health(state: StateDep) -> JSONResponse:
    if state.status == "ready" and state.reasoner is not None:
        r = state.reasoner
        body = {"status": "ok", "model": state.model_name, "engine": r.engine.kind, "variant": r.variant}
        return JSONResponse(body)
    body = {"status": state.status, "model": state.model_name}
    if state.error:
        body["error"] = state.error
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@ops_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(require_key)],
)
async def metrics(state: StateDep) -> PlainTextResponse:
    text = state.metrics.render(state.admitted, state.status == "ready")
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


page_router = APIRouter(include_in_schema=False)


@page_router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


# ---- middleware: body limit, metrics -----------------------------------------------------------------------


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


# ---- the app -----------------------------------------------------------------------------------------------


def _default_loader(s: Settings) -> Reasoner:
    return Reasoner.load(s.model_dir or "", engine=s.engine, variant=s.variant, n_threads=s.threads)


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
    load = loader or _default_loader
    state = ModelState(settings, reasoner)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # ModelState's asyncio objects must belong to the serving loop: rebuild them here.
        state.gate = asyncio.Lock()
        task = None
        if state.reasoner is None:

            async def load_in_background() -> None:
                try:
                    state.reasoner = await asyncio.to_thread(load, settings)
                    state.status = "ready"
                    log.info("model ready: %s (%s)", state.model_name, state.reasoner.variant)
                except Exception as e:
                    state.status, state.error = "failed", str(e)
                    log.error("model failed to load: %s", e)
                    if on_load_failed is not None:
                        on_load_failed(e)

            task = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            if task is not None:
                if not task.done():
                    await asyncio.wait([task])  # a load thread cannot be interrupted; let it finish
                if state.reasoner is not None:
                    state.reasoner.close()

    app = FastAPI(
        title="nestling",
        version="0.1.0",
        description="A distilled reasoner: answers with checked steps and latency.",
        lifespan=lifespan,
    )
    app.state.model = state
    app.state.settings = settings

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

    for router in (answer_router, openai_router, ops_router, page_router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(LimitsAndMetrics, state=state)
    return app
