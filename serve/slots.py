"""The model behind the server and the queue in front of it: a request waits (in arrival order) for one of
the reasoner's engines; only beyond ``max_queue`` admitted requests is one refused (429, Retry-After), and a
wait longer than ``queue_timeout_s`` ends in 503.

    state = ModelState(settings, reasoner)          # reasoner None: it loads in the background
    answer = await state.ask(settings, Job(question, explain=True, max_tokens=64))
    events = await state.stream(settings, job)      # ("piece", str)... then ("answer", a) or ("error", e)
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from nestling.serve.metrics import Metrics
from nestling.serve.runtime import GREEDY, Answer, Reasoner
from nestling.serve.sampling import SamplingParams
from nestling.serve.settings import Settings

from nestling.core.errors import ApiError, NestlingError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One generation a request asks for."""

    question: str
    explain: bool
    max_tokens: int
    sampling: SamplingParams = GREEDY
    stop: list[str] = field(default_factory=list)
    verify: int = 1
    verify_budget_s: float = 10.0
    calculator: bool = False


class ModelState:
    """The reasoner, its load status and the admission queue in front of its engines (event-loop side)."""

    def __init__(self, settings: Settings, reasoner: Reasoner | None):
        self.settings = settings
        self.reasoner = reasoner
        self.status: Literal["loading", "ready", "failed"] = "ready" if reasoner else "loading"
        self.error: str | None = None
        self.admitted = 0  # answering + waiting
        self.running = 0
        # One per engine; remade by ready() on the serving loop (a test client may start a new loop).
        self.slots = asyncio.Semaphore(reasoner.pool) if reasoner else None
        self.service_s = 0.05  # moving mean of one answer's seconds: the Retry-After estimate
        self.metrics = Metrics(lambda: self.admitted, lambda: self.status == "ready", lambda: self.running)
        self.created = int(time.time())

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        if self.reasoner is not None:
            return self.reasoner.name
        return Path(self.settings.model_dir or "nestling").name

    def ready(self, reasoner: Reasoner) -> None:
        self.reasoner, self.status = reasoner, "ready"
        self.slots = asyncio.Semaphore(reasoner.pool)

    def retry_after(self) -> str:
        pool = self.reasoner.pool if self.reasoner is not None else 1
        return str(max(1, math.ceil(self.admitted * self.service_s / pool)))

    async def admit(self, settings: Settings) -> Reasoner:
        """Wait for a free engine; 503 while loading or after the wait limit, 429 beyond the queue cap."""
        if self.status != "ready" or self.reasoner is None or self.slots is None:
            loading = self.status == "loading"
            detail = "model is loading; retry shortly" if loading else f"model failed: {self.error}"
            raise ApiError(503, detail, "model_not_ready", {"Retry-After": "1"})
        if self.admitted >= settings.max_queue:
            raise ApiError(
                429, f"server busy: {self.admitted} requests queued (max_queue {settings.max_queue}); retry",
                "overloaded", {"Retry-After": self.retry_after()},
            )  # fmt: skip
        self.admitted += 1
        try:
            async with asyncio.timeout(settings.queue_timeout_s):
                await self.slots.acquire()
        except TimeoutError:
            self.admitted -= 1
            raise ApiError(
                503, f"waited {settings.queue_timeout_s:g} s for an engine; the server is overloaded, retry",
                "queue_timeout", {"Retry-After": self.retry_after()},
            ) from None  # fmt: skip
        except BaseException:
            self.admitted -= 1
            raise
        self.running += 1
        return self.reasoner

    def release(self, started: float, *_: object) -> None:
        """Called when the worker thread is done (not when the request is: a cancelled one still runs)."""
        self.running -= 1
        self.admitted -= 1
        self.service_s = 0.9 * self.service_s + 0.1 * (time.perf_counter() - started)
        assert self.slots is not None
        self.slots.release()

    async def ask(self, settings: Settings, job: Job) -> Answer:
        r = await self.admit(settings)
        loop = asyncio.get_running_loop()
        call = partial(
            r.ask, job.question, job.explain, job.max_tokens, sampling=job.sampling, stop=job.stop,
            verify=job.verify, verify_budget_s=job.verify_budget_s, calculator=job.calculator,
        )  # fmt: skip
        fut = loop.run_in_executor(None, call)
        fut.add_done_callback(partial(self.release, time.perf_counter()))
        a = await asyncio.shield(fut)
        self.metrics.answered(a)
        return a

    async def stream(self, settings: Settings, job: Job) -> AsyncIterator[tuple[str, Any]]:
        """Admit first (so 429/503 are real statuses), then ("piece", str)... and ("answer", Answer).

        Closing the iterator (the client left) stops the generation at its next token."""
        r = await self.admit(settings)
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
                s = r.stream(
                    job.question, job.explain, job.max_tokens, cancel, sampling=job.sampling, stop=job.stop
                )
                for piece in s:
                    put(("piece", piece))
                put(("answer", s.answer))
            except NestlingError as e:  # the request's fault (e.g. a prompt longer than the context)
                put(("error", e))
            except Exception as e:
                log.exception("generation failed")
                put(("error", e))

        fut = loop.run_in_executor(None, work)
        fut.add_done_callback(partial(self.release, time.perf_counter()))

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
