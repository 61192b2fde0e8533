"""GET /v1/models (OpenAI-compatible), /health (no key: for load balancers) and /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from nestling.serve.metrics import CONTENT_TYPE
from nestling.serve.routers.common import StateDep, require_key

router = APIRouter(tags=["ops"])


@router.get("/v1/models", summary="The served model (OpenAI-compatible)", dependencies=[Depends(require_key)])
async def models(state: StateDep) -> dict[str, Any]:
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nestling"}
    return {"object": "list", "data": [card]}


@router.get("/health", summary="200 when the model is ready, 503 while loading or after a failed load")
async def health(state: StateDep) -> JSONResponse:
    if state.status == "ready" and state.reasoner is not None:
        r = state.reasoner
        body = {"status": "ok", "model": state.model_name, "engine": r.engine.kind, "variant": r.variant}
        return JSONResponse(body)
    body = {"status": state.status, "model": state.model_name}
    if state.error:
        body["error"] = state.error
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get(
    "/metrics", summary="Prometheus metrics", response_class=Response, dependencies=[Depends(require_key)]
)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
