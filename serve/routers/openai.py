"""POST /v1/chat/completions, OpenAI-compatible (the ``openai`` SDK and chat UIs), streaming or not.

The student answers one question: the last message must be the user's, a system (or developer) message is
put before it (or refused, ``system_messages=refuse``), earlier turns are refused with 422, never dropped.
``reasoning_format: "deepseek"`` puts the steps in ``message.reasoning_content`` (``delta.reasoning_content``
when streaming) and only the answer in ``content``, as llama.cpp's ``--reasoning-format deepseek`` does.
Sampling fields (temperature, top_p, top_k, seed, stop) are honoured; ``n`` > 1 gives n choices (seeds
seed, seed+1, ...; not with ``stream``).

The reply carries a ``nestling`` extension field (the last chunk when streaming): the question, the answer,
every step with its ``ok`` and ``status`` mark (grounded | false | ungrounded | unchecked) and ``reason``,
``marks`` (the statuses in order), ``answer_derived``, ``complete``, ``verified``, ``tries``, ``corrections``
(with the ``calculator`` extension: results it replaced; such a step has ``corrected_from``) and the latency.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Depends
from nestling.serve.routers.common import (
    SamplingFields,
    SettingsDep,
    StateDep,
    event,
    invalid,
    require_key,
    resolve_limits,
    sse_response,
    stream_error,
)
from nestling.serve.runtime import Answer
from nestling.serve.settings import Settings
from nestling.serve.slots import Job
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from nestling.core.errors import ApiError
from nestling.core.prompting import ANSWER_MARK

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_key)])

MAX_MESSAGES = 64  # the student reads one question; a long history is refused before it is parsed further
ReasoningFormat = Literal["none", "deepseek"]


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


class ChatRequest(SamplingFields):
    # Other fields are accepted: those without effect on the reply (user, metadata, ...) as they are, those
    # that would change it (UNSUPPORTED) only when they ask for nothing.
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="choices; > 1 not with stream; cap: server max_choices")
    explain: bool = Field(True, description="nestling extension: false asks for the answer only")
    reasoning_format: ReasoningFormat | None = Field(
        None, description="deepseek: steps in reasoning_content, the answer in content; default: server"
    )
    verify: int | None = Field(None, ge=1, le=16, description="nestling extension: tries, see /v1/answer")
    calculator: StrictBool | None = Field(None, description="nestling extension: see /v1/answer")


# Fields that would change the reply but this server cannot honour: refused unless they ask for nothing.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logit_bias": (None, {}),
    "logprobs": (False, None), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}  # fmt: skip


def refuse_unsupported(req: ChatRequest) -> None:
    asked = [k for k, v in (req.model_extra or {}).items() if k in UNSUPPORTED and v not in UNSUPPORTED[k]]
    if asked:
        raise invalid(f"{', '.join(sorted(asked))}: not supported by this server; leave them out")


def chat_question(messages: list[ChatMessage], settings: Settings) -> str:
    """The one question the student is asked: the last user message, system text before it."""
    system = [m.text().strip() for m in messages if m.role in ("system", "developer")]
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if not turns or turns[-1].role != "user":
        raise invalid("messages: the last message must be a user message with the question")
    if len(turns) > 1:
        raise invalid(
            f"messages: {len(turns) - 1} earlier turns; this student answers one question at a time and "
            "cannot use them: send the question alone (a system message may come with it)"
        )
    if any(system) and settings.system_messages == "refuse":
        raise invalid("messages: this server refuses system messages (system_messages=refuse); drop them")
    return " ".join([*filter(None, system), turns[-1].text()])


def split_reasoning(text: str) -> tuple[str, str]:
    """(the steps, the answer) of an explanation; no answer line: all of it is reasoning."""
    at = 0 if text.startswith(ANSWER_MARK) else text.find("\n" + ANSWER_MARK) + 1
    if at == 0 and not text.startswith(ANSWER_MARK):
        return text.strip(), ""
    return text[:at].strip(), text[at + len(ANSWER_MARK) :].strip()


class ReasoningSplitter:
    """Streamed pieces in, ("reasoning_content" | "content", text) out: the answer line is content, the
    lines before it reasoning. A line is held only while it could still turn out to be the answer line."""

    def __init__(self) -> None:
        self.buf = ""
        self.line_start = True
        self.answer = False
        self.said_reasoning = self.said_answer = False
        self.newline = False  # a line break between reasoning lines, sent once the next line is

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.answer:
                text, self.buf = self.buf if self.said_answer else self.buf.lstrip(), ""
                self.said_answer = self.said_answer or bool(text)
                out += [("content", text)] if text else []
                break
            if self.line_start and self.buf.startswith(ANSWER_MARK):
                self.answer, self.buf = True, self.buf[len(ANSWER_MARK) :]
                continue
            if self.line_start and ANSWER_MARK.startswith(self.buf):
                break  # maybe the answer line: wait for more
            nl = self.buf.find("\n")
            line, self.buf = (self.buf, "") if nl < 0 else (self.buf[:nl], self.buf[nl + 1 :])
            out += self._reasoning(line)
            self.line_start = nl >= 0
            self.newline = self.newline or (nl >= 0 and self.said_reasoning)
        return out

    def _reasoning(self, text: str) -> list[tuple[str, str]]:
        if not self.said_reasoning:
            text = text.lstrip()
        if not text:
            return []
        if self.newline:
            text, self.newline = "\n" + text, False
        self.said_reasoning = True
        return [("reasoning_content", text)]

    def end(self) -> list[tuple[str, str]]:
        """What was held back when the text ended (it never became the answer line)."""
        rest, self.buf = self.buf, ""
        return self._reasoning(rest) if rest else []


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(answers: list[Answer]) -> dict[str, int]:
    p = answers[0].latency.prompt_tokens
    c = sum(a.latency.completion_tokens for a in answers)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _message(a: Answer, fmt: ReasoningFormat) -> dict[str, Any]:
    if fmt == "deepseek":
        reasoning, content = split_reasoning(a.text)
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {"role": "assistant", "content": a.text.lstrip()}


def _nestling(a: Answer, question: str) -> dict[str, Any]:
    """The ``nestling`` extension field: each step with its mark (``status``: grounded | false | ungrounded
    | unchecked, and ``reason``), whether the answer is derived from the steps, whether it is complete."""
    return {
        "question": question, "answer": a.answer, "steps": a.to_dict()["steps"],
        "marks": [s.status for s in a.steps], "answer_derived": a.answer_derived, "complete": a.complete,
        "verified": a.verified, "tries": a.tries, "corrections": a.corrections, "latency": asdict(a.latency),
    }  # fmt: skip


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(req: ChatRequest, state: StateDep, settings: SettingsDep) -> Any:
    if req.model is not None and req.model != state.model_name:
        raise ApiError(
            404, f"model {req.model!r} is not served here; use {state.model_name!r}", "model_not_found"
        )
    if req.n > settings.max_choices:
        raise invalid(f"n {req.n}: this server gives at most {settings.max_choices} choices")
    if req.n > 1 and req.stream:
        raise invalid("n > 1 with stream is not supported; ask for one choice per streamed request")
    refuse_unsupported(req)
    question = chat_question(req.messages, settings)
    max_tokens = resolve_limits(settings, question, req.max_completion_tokens or req.max_tokens)
    verify = req.verify or settings.verify
    calculator = settings.calculator if req.calculator is None else req.calculator
    jobs = [
        Job(
            question,
            req.explain,
            max_tokens,
            req.sampling(i),
            req.stops(),
            verify,
            settings.verify_budget_s,
            calculator,
        )  # fmt: skip
        for i in range(req.n)
    ]
    # Answer-only replies have no steps: their text is the answer, whatever the format.
    fmt: ReasoningFormat = (req.reasoning_format or settings.reasoning_format) if req.explain else "none"
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": state.model_name}
    if not req.stream:
        answers = await asyncio.gather(*(state.ask(settings, j) for j in jobs))
        choices = [
            {"index": i, "message": _message(a, fmt), "finish_reason": _finish(a.finish_reason)}
            for i, a in enumerate(answers)
        ]
        out = {**head, "object": "chat.completion", "choices": choices, "usage": _usage(list(answers))}
        return {**out, "nestling": _nestling(answers[0], question)}
    events = await state.stream(settings, jobs[0])
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return sse_response(_chunks(events, head, fmt, include_usage, question))


async def _chunks(
    events: AsyncIterator[tuple[str, Any]],
    head: dict[str, Any],
    fmt: ReasoningFormat,
    include_usage: bool,
    question: str,
) -> AsyncIterator[dict[str, str]]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, str]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return event({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    split = ReasoningSplitter() if fmt == "deepseek" else None
    started = False
    async for kind, value in events:
        if kind == "piece":
            if split is not None:
                for field, text in split.feed(value):
                    yield chunk({field: text})
                continue
            text = value if started else value.lstrip()  # targets open with a newline or a space
            if text:
                started = True
                yield chunk({"content": text})
        elif kind == "answer":
            for field, text in split.end() if split is not None else []:
                yield chunk({field: text})
            # The marks are known once the text is: the last chunk carries the extension field.
            yield chunk(
                {}, _finish(value.finish_reason), usage=_usage([value]), nestling=_nestling(value, question)
            )
            if include_usage:
                usage = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage([value])}
                yield event(usage)
        else:
            yield event({"error": stream_error(value)})
    yield event("[DONE]")
