"""What the routers share: JSON errors, the injected settings and model state, the API-key check, the
limits, the sampling fields of a request, and SSE framing through sse-starlette.

    @router.post("/x")
    async def x(req: Req, state: StateDep, settings: SettingsDep): ...
    app.dependency_overrides[get_settings] = lambda: Settings(api_key="k")    # in a test
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from nestling.serve.runtime import MAX_STOP, MAX_STOP_CHARS
from nestling.serve.sampling import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, SamplingParams
from nestling.serve.settings import Settings
from nestling.serve.slots import ModelState
from pydantic import BaseModel, Field, StrictInt
from sse_starlette import EventSourceResponse

from nestling.core.errors import ApiError, NestlingError

__all__ = ["ApiError", "error_response", "get_settings", "get_state", "require_key", "sse_response"]


def error_response(
    status: int, message: str, type_: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(message: str) -> ApiError:
    return ApiError(422, message, "invalid_request_error")


def get_settings(request: Request) -> Settings:
    """The app's settings; tests swap them with ``app.dependency_overrides[get_settings]``."""
    return request.app.state.settings


def get_state(request: Request) -> ModelState:
    return request.app.state.model


SettingsDep = Annotated[Settings, Depends(get_settings)]
StateDep = Annotated[ModelState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="NESTLING_API_KEY, when the server has one")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key, another header")


async def require_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_key_header)],
) -> None:
    if settings.api_key is None:
        return
    given = bearer.credentials if bearer is not None else (header or "")
    if not secrets.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
        raise ApiError(
            401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )  # fmt: skip


def resolve_limits(settings: Settings, question: str, max_tokens: int | None) -> int:
    if not question.strip():
        raise invalid("question is empty; ask something")
    if len(question) > settings.max_question_chars:
        raise invalid(f"question has {len(question)} characters; the limit is {settings.max_question_chars}")
    n = settings.default_max_tokens if max_tokens is None else max_tokens
    if n > settings.max_tokens_cap:
        raise invalid(f"max_tokens {n} exceeds this server's cap {settings.max_tokens_cap}")
    return n


class SamplingFields(BaseModel):
    """Sampling as OpenAI and llama.cpp name it. Omitted: greedy, the default."""

    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, description="0: greedy (the default)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    top_k: StrictInt | None = Field(None, ge=0, le=MAX_TOP_K, description="0: off")
    seed: StrictInt | None = Field(None, ge=-1, le=MAX_SEED, description="same seed, same answer; -1: random")
    stop: str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(
        None, max_length=MAX_STOP, description=f"up to {MAX_STOP} strings; the text ends before the first"
    )

    def sampling(self, choice: int = 0) -> SamplingParams:
        """The runtime's sampling for choice ``choice`` of n (seeds seed, seed+1, ...)."""
        seed = None if self.seed in (None, -1) else self.seed + choice
        return SamplingParams(
            temperature=self.temperature or 0.0, top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, seed=seed,
        )  # fmt: skip

    def stops(self) -> list[str]:
        if isinstance(self.stop, str):
            if not 0 < len(self.stop) <= MAX_STOP_CHARS:
                raise invalid(f"stop: must be 1 to {MAX_STOP_CHARS} characters")
            return [self.stop]
        return list(self.stop or [])


def stream_error(e: BaseException) -> dict[str, Any]:
    """The error event of a stream that already answered 200: the status its cause would have had."""
    if isinstance(e, NestlingError):
        return {"message": str(e), "type": "invalid_request_error", "code": 422}
    return {"message": "generation failed", "type": "server_error", "code": 500}


def event(data: Any, name: str | None = None) -> dict[str, str]:
    """One SSE event for sse-starlette: ``data`` as JSON, a string (e.g. "[DONE]") as it is."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return {"data": text} if name is None else {"event": name, "data": text}


def sse_response(events: AsyncIterator[dict[str, str]]) -> EventSourceResponse:
    # "\n" line ends: what OpenAI and llama.cpp send, and what simple line-splitting clients expect.
    return EventSourceResponse(events, sep="\n", ping=15)
