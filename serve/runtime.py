"""The torch-free runtime: load an exported reasoner, ask it, get the answer, checked steps and latency.

    from nestling.serve import Reasoner
    r = Reasoner.load("runs/default/exports/tiny")            # engine="auto": the manifest's default variant
    a = r.ask("What is 7 + 5?")                                 # explain=True: steps, then the answer
    a.answer, [(s.text, s.ok) for s in a.steps], a.latency.ttft_s
    s = r.stream("What is 7 + 5?")                              # text pieces as tokens arrive
    for piece in s: print(piece, end="")
    s.answer.latency.tokens_per_s

Imports nothing heavier than the engine it loads (llama-cpp-python or onnxruntime + tokenizers, both through
``serve.engines``), so it runs where torch and transformers are not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestling.serve.config import check
from nestling.serve.errors import NestlingError
from nestling.serve.explain import check_steps, clean_answer, extract_answer, parse_steps
from nestling.serve.manifest import read_manifest, verify_files
from nestling.serve.prompting import ANSWER_MARK, PROMPT_FORMAT, student_prompt

if TYPE_CHECKING:  # the protocol only: importing serve.engines here would load numpy for nothing
    from nestling.serve.engines import Engine

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256


@dataclass
class EngineKind:
    """How to load one engine kind and whether its library is importable here (for engine="auto")."""

    load: Callable[[str, int], Engine]
    available: Callable[[], bool]


def _load_real(kind: str) -> Callable[[str, int], Engine]:
    def load(path: str, n_threads: int) -> Engine:
        from nestling.serve.engines import load_engine  # the engine libraries load only when a model does

        return load_engine(path, kind=kind, n_threads=n_threads)

    return load


def _importable(*modules: str) -> Callable[[], bool]:
    return lambda: all(importlib.util.find_spec(m) is not None for m in modules)


ENGINES: dict[str, EngineKind] = {
    "gguf": EngineKind(_load_real("gguf"), _importable("llama_cpp")),
    "onnx": EngineKind(_load_real("onnx"), _importable("onnxruntime", "tokenizers")),
}


def register_engine(kind: str, load: Callable[[str, int], Engine], available: Callable[[], bool]) -> None:
    """Add an engine kind that manifests can name (tests register a scripted fake this way)."""
    ENGINES[kind] = EngineKind(load, available)


@dataclass
class Step:
    """One step of an explanation. ``ok``: True every calculation in it checks out, False one is wrong,
    None nothing checkable. ``claims``: the checked calculations (expr, stated, value, ok)."""

    text: str
    ok: bool | None
    claims: list[dict[str, Any]] = field(default_factory=list)


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
    stopped_by: str = "eos"  # eos | answer_line (text after the answer was dropped) | max_tokens | cancelled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TokenStream:
    """Iterate for text pieces as the model produces them; ``answer`` holds the full Answer at the end.

    Holds the reasoner's lock while it runs: exhaust it or call ``close()`` (or use ``with``).
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


def _validate(question: str, max_tokens: int) -> None:
    check(isinstance(question, str) and bool(question.strip()), "question is empty; ask something")
    check(
        isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1,
        f"max_tokens {max_tokens!r}: must be an integer >= 1",
    )


class Reasoner:
    """An exported student behind one engine. Calls are serialized (engines are not re-entrant)."""

    def __init__(
        self,
        engine: Engine,
        *,
        variant: str,
        name: str = "nestling",
        task: str | None = None,
        manifest: dict[str, Any] | None = None,
    ):
        self.engine = engine
        self.variant = variant
        self.name = name
        self.task = task
        self.manifest = manifest or {}
        self._lock = threading.Lock()

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
        cls, path: str | Path, engine: str = "auto", variant: str | None = None, n_threads: int = 1
    ) -> Reasoner:
        """Read DIR/manifest.json, verify the sha256 of the chosen variant's files, and load its engine."""
        root = Path(path)
        check(root.is_dir(), f"{root}: not a directory; pass an export directory (runs/NAME/exports/STUDENT)")
        check(n_threads >= 1, f"--threads {n_threads}: must be >= 1")
        manifest = read_manifest(root, stage="export")
        fmt = manifest.get("prompt_format", PROMPT_FORMAT)
        check(fmt == PROMPT_FORMAT, f"{root}: prompt format {fmt!r}, this runtime speaks {PROMPT_FORMAT!r}")
        name = cls.pick_variant(manifest, engine, variant)
        spec = manifest["variants"][name]
        kind, rel = spec.get("engine"), spec.get("path")
        check(isinstance(rel, str) and bool(rel), f"{root}: variant {name} has no path; re-export")
        verify_files(root, manifest, [rel])  # refuses truncated / tampered files before any parser sees them
        t0 = time.perf_counter()
        try:
            eng = ENGINES[kind].load(str(root / rel), n_threads)
        except NestlingError:
            raise
        except Exception as e:  # the file matched its hash, so the artifact itself is unusable here
            raise NestlingError(f"{root / rel}: the {kind} engine cannot load it ({e}); re-export it") from e
        log.info("loaded %s (%s) in %.2f s", name, kind, time.perf_counter() - t0)
        student = manifest.get("student") or {}
        return cls(
            eng,
            variant=name,
            name=str(student.get("name") or root.name),
            task=manifest.get("task"),
            manifest=manifest,
        )

    def close(self) -> None:
        with self._lock:
            self.engine.close()

    def __enter__(self) -> Reasoner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- answering ----------------------------------------------------------------------------------

    def ask(self, question: str, explain: bool = True, max_tokens: int = DEFAULT_MAX_TOKENS) -> Answer:
        """Generate greedily and return the answer, the checked steps (explain mode) and the latency."""
        _validate(question, max_tokens)
        holder: list[Answer] = []
        for _ in self._generate(question, explain, max_tokens, holder):
            pass
        return holder[0]

    def stream(
        self,
        question: str,
        explain: bool = True,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        cancel: threading.Event | None = None,
    ) -> TokenStream:
        """Text pieces as tokens come (multi-byte characters are never split); ``.answer`` once done.

        ``cancel``: set it from another thread to stop early (finish_reason "cancelled").
        """
        _validate(question, max_tokens)
        holder: list[Answer] = []
        return TokenStream(self._generate(question, explain, max_tokens, holder, cancel), holder)

    def _generate(
        self,
        question: str,
        explain: bool,
        max_tokens: int,
        holder: list[Answer],
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        eng = self.engine
        with self._lock:
            t0 = time.perf_counter()
            prompt_ids = eng.tokenize(student_prompt(question, explain))
            ids: list[int] = []
            text = ""  # what has been emitted so far
            # Incremental detokenization over a window (prefix_off..): a piece is emitted once the bytes
            # decoded so far form whole characters, and leading-space handling of the first token in a
            # window cancels out because both decodes start at the same token.
            prefix_off = read_off = 0
            first = last = t0
            finish, stopped_by = "length", "max_tokens"
            cut = False  # stopped at the end of the answer line, the rest is not part of the answer
            gen = eng.stream(prompt_ids, max_tokens)
            try:
                for tok in gen:
                    last = time.perf_counter()
                    if not ids:
                        first = last
                    ids.append(tok)
                    if cancel is not None and cancel.is_set():
                        finish = stopped_by = "cancelled"
                        break
                    prefix_text = eng.detokenize(ids[prefix_off:read_off]) if read_off > prefix_off else ""
                    new_text = eng.detokenize(ids[prefix_off:])
                    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                        piece = new_text[len(prefix_text) :]
                        prefix_off, read_off = read_off, len(ids)
                        stop = _stop_index(text + piece, explain)
                        if stop is not None:
                            piece = piece[: stop - len(text)]
                            finish, cut, stopped_by = "stop", True, "answer_line"
                        if piece:
                            text += piece
                            yield piece
                        if cut:
                            break
                else:
                    # Engines also stop at the end of their context: that is a cut, not an eos.
                    budget = min(
                        max_tokens, getattr(eng, "n_ctx", max_tokens + len(prompt_ids)) - len(prompt_ids)
                    )
                    finish = "length" if len(ids) >= budget else "stop"
                    stopped_by = "max_tokens" if finish == "length" else "eos"
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    close()
            if not cut and finish != "cancelled" and read_off < len(ids):
                # Flush a trailing partial character (it decodes as U+FFFD rather than vanish).
                done = eng.detokenize(ids[prefix_off:read_off]) if read_off > prefix_off else ""
                tail = eng.detokenize(ids[prefix_off:])[len(done) :]
                if tail:
                    text += tail
                    yield tail
        answer = self._finish(text, explain, prompt_ids, ids, t0, first, last, finish)
        answer.stopped_by = stopped_by
        holder.append(answer)

    def _finish(
        self,
        text: str,
        explain: bool,
        prompt_ids: list[int],
        ids: list[int],
        t0: float,
        first: float,
        last: float,
        finish: str,
    ) -> Answer:
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
            engine=self.engine.kind,
            variant=self.variant,
        )
        if explain:
            checks = check_steps(parse_steps(text), self.task)
            steps = [Step(c.text, c.ok, [asdict(x) for x in c.claims]) for c in checks]
            answer = extract_answer(text)
        else:
            steps = []
            line = text.strip().split("\n", 1)[0] if text.strip() else ""
            answer = clean_answer(line) or None
        return Answer(answer=answer, steps=steps, text=text, latency=latency, finish_reason=finish)
