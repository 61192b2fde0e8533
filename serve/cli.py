"""`nestling serve | ask`: what the runtime's commands do and print (torch-free; the command map, with flags
from AskConfig and Settings, is the root's cli.py).

    nestling ask runs/default/exports/tiny "What is 7 + 5?"            # steps, answer, one latency line
    nestling ask runs/default/exports/tiny "What is 7 + 5?" --no-explain
    nestling ask runs/default/exports/tiny "What is 7 + 5?" --verify 4      # resample while a step is false
    nestling ask runs/default/exports/tiny "What is 7 + 5?" --calculator    # correct false results as written
    nestling ask runs/default/exports/tiny --file questions.jsonl > answers.jsonl  # {"question": ...} a line
    nestling serve runs/default/exports/tiny --port 8000             # http://127.0.0.1:8000
    NESTLING_API_KEY=s3cret nestling serve runs/default/exports/tiny  # /v1/* then needs the key

Engine libraries, fastapi and uvicorn load inside the handlers, so `nestling --help` stays fast.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nestling.serve.sampling import SamplingParams

from nestling.core.config import check
from nestling.core.errors import NestlingError

if TYPE_CHECKING:
    from nestling.serve.runtime import Answer
    from nestling.serve.settings import Settings

ENGINE_CHOICES = ["auto", "gguf", "onnx"]
# By step status (core.explain.STEP_STATUSES): "?" is true arithmetic on a number from nowhere.
MARKS = {"grounded": "\u2713", "false": "\u2717", "ungrounded": "?", "unchecked": "\u00b7"}
VERIFIED = {True: "checked steps hold", False: "a checked step is wrong", None: "nothing to check"}
COMPLETE = {True: "explanation complete", False: "explanation incomplete", None: "not grounded"}


@dataclass
class AskConfig:
    dir: str = field(
        default="",
        metadata={
            "help": "export directory (runs/NAME/exports/STUDENT)",
            "positional": True,
            "required": True,
        },
    )
    question: str | None = field(
        default=None, metadata={"help": "the question, quoted (or --file)", "positional": True}
    )
    explain: bool = field(default=True, metadata={"help": "steps then the answer; --no-explain: answer only"})
    max_tokens: int = field(default=256, metadata={"help": "generation budget in tokens"})
    engine: str = field(default="auto", metadata={"help": "auto | gguf | onnx", "choices": ENGINE_CHOICES})
    variant: str | None = field(default=None, metadata={"help": "manifest variant; default: the export's"})
    threads: int = field(default=1, metadata={"help": "engine threads (1 is often fastest for tiny models)"})
    temperature: float = field(default=0.0, metadata={"help": "0 is greedy; up to 2"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 keeps all"})
    seed: int | None = field(default=None, metadata={"help": "same seed, same answer"})
    stop: list[str] = field(default_factory=list, metadata={"help": "end the text before any of these"})
    verify: int = field(
        default=1,
        metadata={"help": "tries: > 1 resamples (seeded) while the explanation is not complete"},
    )
    calculator: bool = field(
        default=False,
        metadata={
            "help": "replace a false result by the true one as it is written; the model goes on from it"
        },
    )
    file: str | None = field(
        default=None, metadata={"help": 'a JSONL file of {"question": ...}: answers as JSONL on stdout'}
    )
    pool: int = field(default=0, metadata={"help": "with --file: engines answering at once; 0: one per core"})

    def __post_init__(self) -> None:
        check(self.max_tokens >= 1, f"--max-tokens {self.max_tokens}: must be >= 1, e.g. 256")
        check(self.threads >= 1, f"--threads {self.threads}: must be >= 1")
        check(self.pool >= 0, f"--pool {self.pool}: must be >= 0")
        check((self.question is None) != (self.file is None), "ask: give a QUESTION or --file FILE, not both")
        self.sampling = SamplingParams(self.temperature, self.top_p, self.top_k, self.seed)


def format_answer(a: Answer) -> str:
    """Steps with marks (✓ checked and grounded, ✗ a calculation is wrong, ? a number from nowhere,
    · nothing to check), answer, latency."""
    lines = [
        f"  {MARKS.get(s.status, '?')} Step {i}: {s.text}"
        + (f"  (calculator: the model wrote {s.corrected_from})" if s.corrected_from is not None else "")
        for i, s in enumerate(a.steps, 1)
    ]
    lines.append(f"Answer: {a.answer if a.answer is not None else '(none)'}")
    lat = a.latency
    cut = ", cut at --max-tokens" if a.finish_reason == "length" else ""
    tries = f"{a.tries} tries" if a.tries > 1 else "1 try"
    lines.append(
        f"latency: first token {1000 * lat.ttft_s:.1f} ms, total {1000 * lat.total_s:.1f} ms, "
        f"{lat.prompt_tokens} prompt + {lat.completion_tokens} completion tokens, "
        f"{lat.tokens_per_s:,.0f} tokens/s ({lat.variant} on {lat.engine}){cut}; "
        f"{VERIFIED[a.verified]}, {COMPLETE[a.complete] if a.steps else 'no steps'}, {tries}"
    )
    return "\n".join(lines)


def read_questions(path: str) -> list[str]:
    """The questions of a JSONL file: one ``{"question": "..."}`` (or a JSON string) per line."""
    p = Path(path)
    check(p.is_file(), f'--file {p}: not found; pass a JSONL file with one {{"question": ...}} per line')
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f'{p}:{n}: not JSON ({e.msg}); write one {{"question": ...}} per line'
            raise NestlingError(msg) from None
        q = row.get("question") if isinstance(row, dict) else row
        check(isinstance(q, str) and bool(q.strip()), f'{p}:{n}: no "question" string on this line')
        out.append(q)
    check(bool(out), f"--file {p}: no questions in it")
    return out


def ask_main(cfg: AskConfig) -> int:
    """Answer one question (steps with marks, answer, latency) or a file of them (JSONL on stdout)."""
    from nestling.serve.runtime import Reasoner

    questions = read_questions(cfg.file) if cfg.file else [cfg.question]
    kw = {"explain": cfg.explain, "max_tokens": cfg.max_tokens, "sampling": cfg.sampling, "stop": cfg.stop}
    kw["calculator"] = cfg.calculator
    pool = cfg.pool if cfg.file else 1
    with Reasoner.load(cfg.dir, cfg.engine, cfg.variant, n_threads=cfg.threads, pool=pool) as r:
        if not cfg.file:
            print(format_answer(r.ask(cfg.question, verify=cfg.verify, **kw)))
            return 0
        t0 = time.perf_counter()
        answers = r.ask_many(questions, verify=cfg.verify, **kw)
        for q, a in zip(questions, answers, strict=True):
            print(json.dumps({"question": q, **a.to_dict()}, ensure_ascii=False))
        took = time.perf_counter() - t0
        n = len(answers)
        print(f"{n} answers in {took:.2f} s ({n / took:.1f}/s, {r.pool} engines)", file=sys.stderr)
    return 0


def serve_main(s: Settings) -> int:
    """Check the export and the port, then serve until Ctrl-C."""
    from nestling.serve.runtime import Reasoner

    from nestling.core.manifest import read_manifest

    check(bool(s.model_dir), "no export directory: pass DIR or set NESTLING_MODEL_DIR")
    # Cheap checks before the port opens; hashing and loading happen in the background at startup.
    Reasoner.pick_variant(read_manifest(s.model_dir, stage="export"), s.engine, s.variant)
    try:
        with socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((s.host, s.port))
    except OSError as e:
        msg = f"cannot listen on {s.host}:{s.port} ({e.strerror}); use another --port"
        raise NestlingError(msg) from None

    import uvicorn
    from nestling.serve.app import create_app

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failed(e: BaseException) -> None:
        failures.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(s, on_load_failed=on_load_failed)
    # loop="asyncio", not uvloop even where installed: under 32-client load uvloop dropped a few keep-alive
    # connections mid-request (client ReadError) in 3 of 7 runs here; asyncio dropped none in 7.
    config = uvicorn.Config(
        app, host=s.host, port=s.port, log_level="info", loop="asyncio", timeout_keep_alive=s.keep_alive_s
    )
    server = uvicorn.Server(config)
    key = "on" if s.api_key else "off"
    print(f"nestling: serving {s.model_dir} at http://{s.host}:{s.port} (API key {key}; Ctrl-C stops)")
    server.run()
    if failures:
        e = failures[0]
        raise e if isinstance(e, NestlingError) else NestlingError(f"model failed to load: {e}")
    return 0
