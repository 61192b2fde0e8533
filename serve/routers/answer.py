"""POST /v1/answer: the answer, its checked steps and the latency; SSE with ``stream``.

curl -s localhost:8000/v1/answer -d '{"question": "What is 7 + 5?"}'
curl -sN localhost:8000/v1/answer -d '{"question": "What is 7 + 5?", "stream": true, "temperature": 0.7}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from nestling.serve.routers.common import (
    SamplingFields,
    SettingsDep,
    StateDep,
    event,
    require_key,
    resolve_limits,
    sse_response,
    stream_error,
)
from nestling.serve.runtime import Answer
from nestling.serve.settings import Settings
from nestling.serve.slots import Job
from pydantic import ConfigDict, Field, StrictBool

router = APIRouter(prefix="/v1", tags=["answer"], dependencies=[Depends(require_key)])


class AnswerRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, description="the question, in plain text")
    explain: bool = Field(True, description="steps then the answer; false: the answer only (faster)")
    max_tokens: int | None = Field(
        None, ge=1, description="generation budget; default and cap: server settings"
    )
    stream: bool = Field(False, description="server-sent events: 'token' {text}... then 'answer' {...}")
    verify: int | None = Field(
        None, ge=1, le=16,
        description="tries: > 1 resamples until the explanation is complete (not streamed); default: server",
    )  # fmt: skip
    calculator: StrictBool | None = Field(
        None, description="correct a false result as it is written (not streamed); default: server"
    )

    def job(self, settings: Settings, choice: int = 0) -> Job:
        calculator = settings.calculator if self.calculator is None else self.calculator
        return Job(
            self.question, self.explain, resolve_limits(settings, self.question, self.max_tokens),
            self.sampling(choice), self.stops(), self.verify or settings.verify, settings.verify_budget_s,
            calculator,
        )  # fmt: skip


def answer_body(a: Answer, model: str) -> dict[str, Any]:
    return {**a.to_dict(), "model": model}


@router.post("/answer", summary="Answer a question with checked steps and latency")
async def answer(req: AnswerRequest, state: StateDep, settings: SettingsDep) -> Any:
    job = req.job(settings)
    if not req.stream:
        return answer_body(await state.ask(settings, job), state.model_name)
    events = await state.stream(settings, job)

    async def body() -> AsyncIterator[dict[str, str]]:
        async for kind, value in events:
            if kind == "piece":
                yield event({"text": value}, "token")
            elif kind == "answer":
                yield event(answer_body(value, state.model_name), "answer")
            else:
                yield event({"error": stream_error(value)}, "error")

    return sse_response(body())
