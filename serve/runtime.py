"""The torch-free runtime: load an exported reasoner, ask it, get the answer, checked steps and latency.

    from nestling.serve import Reasoner
    r = Reasoner.load("runs/default/exports/tiny")            # engine="auto": the manifest's default variant
    a = r.ask("What is 7 + 5?")                                 # explain=True: steps, then the answer
    a.answer, [(s.text, s.ok) for s in a.steps], a.latency.ttft_s
    s = r.stream("What is 7 + 5?")                              # text pieces as tokens arrive
    for piece in s: print(piece, end="")
    s.answer.latency.tokens_per_s
    r.ask("What is 7 + 5?", sampling=SamplingParams(temperature=0.7, seed=1), stop=["Step 2"])
    r.ask("What is 7 + 5?", verify=4)      # resample until the explanation is complete: a.complete, a.tries
    r.ask("What is 7 + 5?", calculator=True)   # a false result is corrected as it is written: a.corrections
    r.ask_many(["What is 1 + 1?", "What is 2 + 2?"])            # spread over the engine pool

``Reasoner.load(..., pool=N)`` loads N engines over the same file: N questions decode at once, one per
engine, from any number of threads; a call waits for a free engine.

Imports nothing heavier than the engine it loads (llama-cpp-python or onnxruntime + tokenizers, both through
``serve.engines``), so it runs where torch and transformers are not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestling.serve.sampling import SamplingParams

from nestling.core.calculator import Slip, read_lines
from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.explain import clean_answer, extract_answer, ground, parse_steps
from nestling.core.manifest import read_manifest, verify_files
from nestling.core.prompting import ANSWER_MARK, PROMPT_FORMAT, student_prompt

if TYPE_CHECKING:  # the protocol only: importing serve.engines here would load numpy for nothing
    from nestling.serve.engines import Engine

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_STOP = 16  # stop strings per request: each is searched for after every token
MAX_STOP_CHARS = 200
GREEDY = SamplingParams()
# Resampling a false explanation needs some randomness; greedy would repeat the same mistake.
VERIFY_TEMPERATURE = 0.7
# Corrections per answer: each one re-reads the prompt and the text so far, so the work stays bounded.
MAX_CORRECTIONS = 16


@dataclass
class EngineKind:
    """How to load one engine kind and whether its library is importable here (for engine="auto")."""

    load: Callable[[str, int], Engine]
    available: Callable[[], bool]
    # pool > 1: engines that share work (one batched llama.cpp context); None: `pool` separate loads
    load_pool: Callable[[str, int, int], list[Engine]] | None = None


def _load_real(kind: str) -> Callable[[str, int], Engine]:
    def load(path: str, n_threads: int) -> Engine:
        from nestling.serve.engines import load_engine  # the engine libraries load only when a model does

        return load_engine(path, kind=kind, n_threads=n_threads)

    return load


def _importable(*modules: str) -> Callable[[], bool]:
    return lambda: all(importlib.util.find_spec(m) is not None for m in modules)


def _load_gguf_batch(path: str, n_threads: int, pool: int) -> list[Engine]:
    from nestling.serve.engines import GGUFBatch

    return list(GGUFBatch(path, slots=pool, n_threads=n_threads).views())


ENGINES: dict[str, EngineKind] = {
    "gguf": EngineKind(_load_real("gguf"), _importable("llama_cpp"), _load_gguf_batch),
    "onnx": EngineKind(_load_real("onnx"), _importable("onnxruntime", "tokenizers")),
}


def register_engine(kind: str, load: Callable[[str, int], Engine], available: Callable[[], bool]) -> None:
    """Add an engine kind that manifests can name (tests register a scripted fake this way)."""
    ENGINES[kind] = EngineKind(load, available)


@dataclass
class Step:
    """One step of an explanation. ``ok``: True every calculation in it checks out, False one is wrong,
    None nothing checkable. ``claims``: the checked calculations (expr, stated, value, ok). ``status``: the
    step against the question (core.explain.STEP_STATUSES): grounded | false | ungrounded | unchecked;
    ``reason`` says why a step is not grounded."""

    text: str
    ok: bool | None
    claims: list[dict[str, Any]] = field(default_factory=list)
    status: str = "unchecked"
    reason: str | None = None
    # the result the model wrote where the calculator put the true one (calculator=True); None: as written
    corrected_from: str | None = None


@dataclass
class Latency:
    ttft_s: float = field(metadata={"help": "seconds from the call to the first generated token"})
    total_s: float = field(metadata={"help": "seconds from the call to the last token"})
    prompt_tokens: int = field(metadata={"help": "tokens in the prompt, bos included"})
    completion_tokens: int = field(metadata={"help": "tokens generated (eos not counted)"})
    tokens_per_s: float = field(
        metadata={"help": "decode rate after the first token; completion_tokens / total_s for one token"}
    )
    engine: str = field(metadata={"help": "gguf | onnx"})
    variant: str = field(metadata={"help": "the manifest variant that answered, e.g. gguf-q8_0"})


@dataclass
class Answer:
    answer: str | None
    steps: list[Step]
    text: str
    latency: Latency
    finish_reason: str = "stop"  # "length" when max_tokens cut the generation short
    # eos | answer_line (text after the answer was dropped) | stop (a stop string) | max_tokens | cancelled
    stopped_by: str = "eos"
    # True: every checkable step holds (at least one was checked); False: a checked step is wrong;
    # None: nothing to check (answer-only mode, or no step states a calculation).
    verified: bool | None = None
    tries: int = 1  # generations made for this answer (> 1 when verification resampled a false one)
    # True: every step is grounded or unchecked (at least one grounded) and the answer is the steps' last
    # result, computing what the question asks (core.explain.ground); False: not so; None: answer-only
    # mode, or a question grounding is not asked of (fewer than two numbers stated).
    complete: bool | None = None
    answer_derived: bool | None = None  # the answer is the steps' last result (None: answer-only mode)
    corrections: int = 0  # false results the calculator replaced while generating (calculator=True)

    def needs_retry(self) -> bool:
        """What verification resamples: an incomplete explanation, else (no grounding) a false step."""
        return self.complete is False if self.complete is not None else self.verified is False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TokenStream:
    """Iterate for text pieces as the model produces them; ``answer`` holds the full Answer at the end.

    Holds one of the reasoner's engines while it runs: exhaust it or call ``close()`` (or use ``with``).
    """

    def __init__(self, pieces: Iterator[str], holder: list[Answer]):
        self._pieces = pieces
        self._holder = holder

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def answer(self) -> Answer:
        if not self._holder:
            raise NestlingError("stream not finished: iterate it to the end before reading .answer")
        return self._holder[0]


def _stop_index(text: str, explain: bool) -> int | None:
    """Where a complete answer ends: after the ``Answer:`` line (explain) or the first line (answer mode).

    The student ends with eos there; a student that keeps going past its answer is cut, so a rambling
    small model cannot spend the whole token budget after it has answered.
    """
    if explain:
        start = 0 if text.startswith(ANSWER_MARK) else text.find("\n" + ANSWER_MARK)
        if start < 0:
            return None
        end = text.find("\n", start + 1)
        return end if end >= 0 else None
    stripped = text.lstrip("\n")
    end = stripped.find("\n")
    return None if end < 0 else len(text) - len(stripped) + end


def _validate(question: str, max_tokens: int, stop: Sequence[str] = ()) -> None:
    check(isinstance(question, str) and bool(question.strip()), "question is empty; ask something")
    check(
        isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1,
        f"max_tokens {max_tokens!r}: must be an integer >= 1",
    )
    check(len(stop) <= MAX_STOP, f"stop: {len(stop)} strings; at most {MAX_STOP}")
    for x in stop:
        check(
            isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS,
            f"stop string {str(x)[:20]!r}: must be 1 to {MAX_STOP_CHARS} characters",
        )


def _stop_string(text: str, stop: Sequence[str], start: int) -> tuple[int | None, int]:
    """Where the first stop string in ``text`` begins (searching only what ``start`` onwards can have
    completed), or None; and how many trailing characters may still grow into one (to hold back)."""
    hits = [i for x in stop if (i := text.find(x, max(0, start - len(x) + 1))) >= 0]
    if hits:
        return min(hits), 0
    hold = max(
        (n for x in stop for n in range(min(len(x) - 1, len(text)), 0, -1) if text.endswith(x[:n])), default=0
    )
    return None, hold


class Reasoner:
    """An exported student behind a pool of engines (one by default). Safe to share between threads: each
    call takes a free engine for its whole generation (engines are not re-entrant) and waits for one."""

    def __init__(
        self,
        engine: Engine | Sequence[Engine],
        *,
        variant: str,
        name: str = "nestling",
        task: str | None = None,
        manifest: dict[str, Any] | None = None,
        prompt: Callable[[str, bool], str] = student_prompt,
    ):
        self.engines: list[Engine] = list(engine) if isinstance(engine, Sequence) else [engine]
        check(bool(self.engines), "Reasoner needs at least one engine")
        self.engine = self.engines[0]  # the pool's engines are alike: kind, tokenizer, n_ctx
        self.variant = variant
        self.name = name
        self.task = task
        self.manifest = manifest or {}
        # (question, explain) -> the text the engine reads; another model's own prompt (e.g. a teacher's chat
        # template) lets benchmarks put that model through the same checks
        self.prompt = prompt
        self._free: queue.SimpleQueue[Engine] = queue.SimpleQueue()
        for e in self.engines:
            self._free.put(e)

    @property
    def pool(self) -> int:
        return len(self.engines)

    @contextmanager
    def _checkout(self) -> Iterator[Engine]:
        eng = self._free.get()
        try:
            yield eng
        finally:
            self._free.put(eng)

    # ---- loading ------------------------------------------------------------------------------------

    @staticmethod
    def pick_variant(manifest: dict[str, Any], engine: str = "auto", variant: str | None = None) -> str:
        """The variant to load: named, else the default one for `engine` ("auto": the default variant if its
        engine library is importable, else the first whose engine is)."""
        variants: dict[str, dict[str, Any]] = manifest.get("variants") or {}
        check(bool(variants), "manifest has no variants; re-run `nestling export` for this student")
        check(
            engine == "auto" or engine in ENGINES,
            f"--engine {engine!r}: unknown; use auto, {', '.join(sorted(ENGINES))}",
        )
        if variant is not None:
            check(variant in variants, f"--variant {variant!r}: not in the export; one of {sorted(variants)}")
            kind = variants[variant].get("engine")
            check(
                engine in ("auto", kind),
                f"--variant {variant} runs on {kind!r}, not {engine!r}; drop --engine or pick another one",
            )
            return variant
        default = manifest.get("default_variant")
        order = ([default] if default in variants else []) + [v for v in variants if v != default]
        wanted = [v for v in order if engine in ("auto", variants[v].get("engine"))]
        check(bool(wanted), f"--engine {engine}: the export has no such variant; it has {sorted(variants)}")
        for v in wanted:
            kind = variants[v].get("engine")
            if kind in ENGINES and ENGINES[kind].available():
                return v
        if engine != "auto":
            extra = "nestling[gguf]" if engine == "gguf" else "nestling[serve]"
            raise NestlingError(f"--engine {engine}: its library is not installed; pip install '{extra}'")
        raise NestlingError(
            f"no engine library for any variant {sorted(variants)}; pip install 'nestling[serve]' (onnx) "
            "or 'nestling[gguf]'"
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        engine: str = "auto",
        variant: str | None = None,
        n_threads: int = 1,
        pool: int = 1,
        batched: bool = False,
    ) -> Reasoner:
        """Read DIR/manifest.json, verify the sha256 of the chosen variant's files, and load ``pool``
        engines over it (``pool=0``: see ``auto_pool``). GGUF with ``batched``: the pool is ``pool`` slots
        of one llama.cpp context decoding together; else ``pool`` separate engines."""
        root = Path(path)
        check(root.is_dir(), f"{root}: not a directory; pass an export directory (runs/NAME/exports/STUDENT)")
        check(n_threads >= 1, f"--threads {n_threads}: must be >= 1")
        check(isinstance(pool, int) and pool >= 0, f"--pool {pool}: must be >= 0 (0: one engine per core)")
        pool = pool or auto_pool(n_threads)
        manifest = read_manifest(root, stage="export")
        fmt = manifest.get("prompt_format", PROMPT_FORMAT)
        check(fmt == PROMPT_FORMAT, f"{root}: prompt format {fmt!r}, this runtime speaks {PROMPT_FORMAT!r}")
        name = cls.pick_variant(manifest, engine, variant)
        spec = manifest["variants"][name]
        kind, rel = spec.get("engine"), spec.get("path")
        check(isinstance(rel, str) and bool(rel), f"{root}: variant {name} has no path; re-export")
        verify_files(root, manifest, [rel])  # refuses truncated / tampered files before any parser sees them
        t0 = time.perf_counter()
        engines: list[Engine] = []
        loader = ENGINES[kind]
        try:
            if pool > 1 and loader.load_pool is not None and batched:
                engines = loader.load_pool(str(root / rel), n_threads, pool)
            for _ in range(pool - len(engines)):
                engines.append(loader.load(str(root / rel), n_threads))
        except Exception as e:
            for loaded in engines:
                loaded.close()
            if isinstance(e, NestlingError):
                raise
            # the file matched its hash, so the artifact itself is unusable here
            raise NestlingError(f"{root / rel}: the {kind} engine cannot load it ({e}); re-export it") from e
        log.info("loaded %s (%s) x%d in %.2f s", name, kind, pool, time.perf_counter() - t0)
        student = manifest.get("student") or {}
        return cls(
            engines,
            variant=name,
            name=str(student.get("name") or root.name),
            task=manifest.get("task"),
            manifest=manifest,
        )

    def close(self) -> None:
        """Close every engine, each once the call using it has finished."""
        for _ in self.engines:
            self._free.get().close()

    def __enter__(self) -> Reasoner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- answering ----------------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        explain: bool = True,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        *,
        sampling: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
        verify: int = 1,
        verify_budget_s: float = 10.0,
        calculator: bool = False,
    ) -> Answer:
        """Generate (greedy unless ``sampling`` says otherwise) and return the answer, the checked steps
        (explain mode) and the latency.

        ``verify`` > 1: while the explanation is not complete (``answer.complete``: every step grounded in
        the question or unchecked, the answer derived from the steps; for a question grounding is not asked
        of, while a checked step is false), generate again, up to ``verify`` tries in all and while
        ``verify_budget_s`` is not spent, sampled with seeds ``seed+1, seed+2, ...`` (at
        ``VERIFY_TEMPERATURE`` when the request is greedy); the first complete explanation is returned, else
        the first one. ``answer.tries`` counts the generations, ``total_s`` all of them.

        ``calculator`` (explain mode): each finished line's first false result is replaced by the true value
        and the model goes on from there (core.calculator); ``answer.corrections`` counts the replacements
        and each corrected step keeps what the model wrote in ``corrected_from``.
        """
        _validate(question, max_tokens, stop)
        check(isinstance(verify, int) and 1 <= verify <= 64, f"verify {verify!r}: tries must be 1 to 64")
        t0 = time.perf_counter()
        once = self._ask_calculated if calculator and explain else self._ask_once
        first = once(question, explain, max_tokens, sampling, stop)
        if verify == 1 or not first.needs_retry():
            return first
        resample = sampling if not sampling.greedy else replace(sampling, temperature=VERIFY_TEMPERATURE)
        base = sampling.seed or 0
        tries = 1
        while tries < verify and time.perf_counter() - t0 < verify_budget_s:
            a = once(question, explain, max_tokens, resample.with_seed(base + tries), stop)
            tries += 1
            if not a.needs_retry():
                return _after_tries(a, tries, t0)
        return _after_tries(first, tries, t0)

    def ask_many(
        self, questions: Sequence[str], explain: bool = True, max_tokens: int = DEFAULT_MAX_TOKENS, **kw: Any
    ) -> list[Answer]:
        """``ask`` for each question, as many at once as the pool has engines; answers in question order."""
        for q in questions:
            _validate(q, max_tokens, kw.get("stop", ()))
        with ThreadPoolExecutor(max_workers=self.pool, thread_name_prefix="ask") as ex:
            return list(ex.map(lambda q: self.ask(q, explain, max_tokens, **kw), questions))

    def stream(
        self,
        question: str,
        explain: bool = True,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        cancel: threading.Event | None = None,
        *,
        sampling: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
    ) -> TokenStream:
        """Text pieces as tokens come (multi-byte characters are never split); ``.answer`` once done.

        ``cancel``: set it from another thread to stop at the next token (finish_reason "cancelled").
        Not verified by resampling: what was streamed cannot be taken back (``answer.verified`` still says).
        """
        _validate(question, max_tokens, stop)
        holder: list[Answer] = []
        gen = self._generate(question, explain, max_tokens, holder, cancel, sampling, tuple(stop))
        return TokenStream(gen, holder)

    def _ask_once(
        self, question: str, explain: bool, max_tokens: int, sampling: SamplingParams, stop: Sequence[str]
    ) -> Answer:
        holder: list[Answer] = []
        for _ in self._generate(question, explain, max_tokens, holder, None, sampling, tuple(stop)):
            pass
        return holder[0]

    def _ask_calculated(
        self, question: str, explain: bool, max_tokens: int, sampling: SamplingParams, stop: Sequence[str]
    ) -> Answer:
        """Explain with the calculator in the loop: generation stops at the first finished line that states a
        false result and restarts from the corrected text (the prompt and text so far read again), at most
        MAX_CORRECTIONS times and within ``max_tokens`` generated in all (discarded tokens count: the
        engine spent them)."""
        with self._checkout() as eng:
            t0 = time.perf_counter()
            prompt = self.prompt(question, explain)
            sampler = sampling.sampler()  # one random state across the pieces: the seed still decides
            run = _Calculated(eng, prompt, tuple(stop), t0)
            while True:
                budget = max_tokens - len(run.ids)
                if budget <= 0:
                    run.finish, run.stopped_by = "length", "max_tokens"
                    break
                # past the cap the model finishes unchecked (the step marks still show what is false)
                if run.piece(budget, sampler, check=len(run.slips) < MAX_CORRECTIONS) is None:
                    break
            times = (t0, run.first or t0, run.last)
            answer = self._finish(run.text, explain, run.prompt_ids, run.ids, times, run.finish, eng.kind)
            self._ground(answer, question)
        answer.stopped_by = run.stopped_by
        _mark_corrections(answer, run.slips)
        return answer

    def _generate(
        self,
        question: str,
        explain: bool,
        max_tokens: int,
        holder: list[Answer],
        cancel: threading.Event | None,
        sampling: SamplingParams,
        stop: tuple[str, ...],
    ) -> Iterator[str]:
        with self._checkout() as eng:
            t0 = time.perf_counter()
            prompt_ids = eng.tokenize(self.prompt(question, explain))
            dec = _Decoder(eng, explain, stop)
            first = last = t0
            finish, stopped_by = "length", "max_tokens"
            sampler = sampling.sampler()
            # Only a sampled request passes `sampler`: engines written before sampling existed still serve.
            gen = (
                eng.stream(prompt_ids, max_tokens)
                if sampler is None
                else eng.stream(prompt_ids, max_tokens, sampler=sampler)
            )
            try:
                for tok in gen:
                    last = time.perf_counter()
                    if not dec.ids:
                        first = last
                    if cancel is not None and cancel.is_set():
                        dec.ids.append(tok)
                        finish = stopped_by = "cancelled"
                        break
                    piece = dec.push(tok)
                    if piece:
                        yield piece
                    if dec.cut:
                        finish, stopped_by = "stop", dec.cut
                        break
                else:
                    # Engines also stop at the end of their context: that is a cut, not an eos.
                    n_ctx = getattr(eng, "n_ctx", max_tokens + len(prompt_ids))
                    finish = "length" if len(dec.ids) >= min(max_tokens, n_ctx - len(prompt_ids)) else "stop"
                    stopped_by = "max_tokens" if finish == "length" else "eos"
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    close()
            if finish != "cancelled":
                tail = dec.flush()
                if tail:
                    yield tail
            answer = self._finish(dec.text, explain, prompt_ids, dec.ids, (t0, first, last), finish, eng.kind)
            if explain:
                self._ground(answer, question)
        answer.stopped_by = stopped_by
        holder.append(answer)

    def _finish(
        self,
        text: str,
        explain: bool,
        prompt_ids: list[int],
        ids: list[int],
        times: tuple[float, float, float],
        finish: str,
        kind: str,
    ) -> Answer:
        """The answer without its step marks (``_ground`` adds them in explain mode); ``times``: the call,
        the first token and the last token."""
        t0, first, last = times
        n = len(ids)
        ttft = (first - t0) if n else 0.0
        total = last - t0
        decode = last - first
        tps = (n - 1) / decode if n > 1 and decode > 0 else (n / total if total > 0 else 0.0)
        latency = Latency(
            ttft_s=ttft,
            total_s=total,
            prompt_tokens=len(prompt_ids),
            completion_tokens=n,
            tokens_per_s=tps,
            engine=kind,
            variant=self.variant,
        )
        if explain:
            answer = extract_answer(text)
        else:
            line = text.strip().split("\n", 1)[0] if text.strip() else ""
            answer = clean_answer(line) or None
        return Answer(answer, [], text, latency, finish_reason=finish)

    def _ground(self, a: Answer, question: str) -> None:
        """Mark every step against the question (core.explain.ground) and set verified / complete."""
        e = ground(question, parse_steps(a.text), a.answer, self.task)
        a.steps = [
            Step(c.text, c.ok, [asdict(x) for x in c.claims], c.status or "unchecked", c.reason)
            for c in e.steps
        ]
        checked = [s.ok for s in a.steps if s.ok is not None]
        a.verified = all(checked) if checked else None
        a.answer_derived = e.answer_derived
        a.complete = e.complete if e.grounding else None


class _Calculated:
    """The state of one calculator-checked generation: the text so far, every token generated, the slips."""

    def __init__(self, eng: Engine, prompt: str, stop: tuple[str, ...], t0: float):
        self.eng, self.prompt, self.stop = eng, prompt, stop
        self.prompt_ids = eng.tokenize(prompt)
        self.text = ""
        self.ids: list[int] = []
        self.slips: list[Slip] = []
        self.checked = 0  # where the first line not yet read by the calculator starts in self.text
        self.first: float | None = None
        self.last = t0
        self.finish, self.stopped_by = "length", "max_tokens"

    def piece(self, budget: int, sampler: Any, check: bool = True) -> Slip | None:
        """Generate from the text so far until a line states a false result (corrected into self.text and
        returned) or the generation ends (None). ``check=False``: no line is read."""
        kw = {} if sampler is None else {"sampler": sampler}
        dec, head = _Decoder(self.eng, True, self.stop), self.text
        # An engine that keeps the prefix it has read re-reads only what changed: after a correction the
        # corrected tail; on a first piece, what differs from the previous request (a teacher's long
        # system prompt and worked example are read once for all its questions).
        again = getattr(self.eng, "resume", self.eng.stream)
        ids = self.prompt_ids if not self.text else self.eng.tokenize(self.prompt + self.text)
        gen = again(ids, budget, **kw)
        try:
            for tok in gen:
                self.last = time.perf_counter()
                self.first = self.first or self.last
                self.ids.append(tok)
                dec.push(tok)
                slip = self._read(head + dec.text, final=False) if check else None
                if slip is not None:
                    return slip
                if dec.cut:
                    self.finish, self.stopped_by = "stop", dec.cut
                    break
            else:
                done = len(dec.ids) >= budget
                self.finish, self.stopped_by = ("length", "max_tokens") if done else ("stop", "eos")
        finally:
            getattr(gen, "close", lambda: None)()
        dec.flush()
        self.text = head + dec.text
        return self._read(self.text, final=self.finish != "length") if check else None

    def _read(self, text: str, final: bool) -> Slip | None:
        """Check each finished line (and the last one when ``final``); on a slip, cut the text there."""
        self.checked, slip = read_lines(text, self.checked, final)
        self.text = text if slip is None else text[: self.checked] + slip.text
        if slip is not None:
            self.slips.append(slip)
        return slip


def _mark_corrections(a: Answer, slips: list[Slip]) -> None:
    """Each corrected step keeps what the model wrote (the first step, in order, stating the correction)."""
    a.corrections = len(slips)
    i = 0
    for slip in slips:
        for j in range(i, len(a.steps)):
            if slip.stated_in(a.steps[j].text):
                a.steps[j].corrected_from = slip.stated
                i = j + 1
                break


def auto_pool(n_threads: int = 1) -> int:
    """One engine per ``n_threads`` cores this process may use: the pool size that keeps every core busy."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // n_threads)


def _after_tries(a: Answer, tries: int, t0: float) -> Answer:
    """The answer with the whole wait: every try's time counts, as the caller waited for all of them."""
    total = time.perf_counter() - t0
    ttft = a.latency.ttft_s + (total - a.latency.total_s)
    return replace(a, tries=tries, latency=replace(a.latency, total_s=total, ttft_s=ttft))


class _Decoder:
    """Token ids in, text pieces out: whole characters only, cut at the answer line or a stop string.

    Incremental detokenization over a window (prefix_off..): a piece is emitted once the bytes decoded so
    far form whole characters, and leading-space handling of the first token in a window cancels out
    because both decodes start at the same token. Text that may still grow into a stop string is held back.
    """

    def __init__(self, eng: Engine, explain: bool, stop: tuple[str, ...]):
        self.eng, self.explain, self.stop = eng, explain, stop
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.held = ""  # decoded, not emitted: it may be the start of a stop string
        self.prefix_off = self.read_off = 0
        self.cut: str | None = None  # "answer_line" | "stop" once the text is complete

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        prefix, new = self._window()
        if len(new) <= len(prefix) or new.endswith("\ufffd"):
            return ""
        self.prefix_off, self.read_off = self.read_off, len(self.ids)
        return self._emit(self.held + new[len(prefix) :])

    def _window(self) -> tuple[str, str]:
        """The window's text up to the last emitted token, and up to the newest one."""
        ids, eng, lo, hi = self.ids, self.eng, self.prefix_off, self.read_off
        return (eng.detokenize(ids[lo:hi]) if hi > lo else ""), eng.detokenize(ids[lo:])

    def _emit(self, piece: str) -> str:
        full = self.text + piece
        end = _stop_index(full, self.explain)
        if end is not None:
            full, self.cut = full[:end], "answer_line"
        hold = 0
        if self.stop:
            at, hold = _stop_string(full, self.stop, len(self.text))
            if at is not None:
                full, self.cut, hold = full[:at], "stop", 0
        if self.cut:
            hold = 0
        out = full[len(self.text) : len(full) - hold]
        self.held = full[len(full) - hold :] if hold else ""
        self.text += out
        return out

    def flush(self) -> str:
        """A trailing partial character (it decodes as U+FFFD rather than vanish) and held-back text."""
        if self.cut:
            return ""
        tail = self.held
        if self.read_off < len(self.ids):
            prefix, new = self._window()
            tail += new[len(prefix) :]
        self.held = ""
        if not tail:
            return ""
        out = self._emit(tail)
        rest, self.held = self.held, ""  # the text ended before it could become a stop string
        self.text += rest
        return out + rest
