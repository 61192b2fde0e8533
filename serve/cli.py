"""`nestling serve | ask`: the runtime's subcommands (torch-free).

    nestling ask runs/default/exports/tiny "What is 7 + 5?"            # steps, answer, one latency line
    nestling ask runs/default/exports/tiny "What is 7 + 5?" --no-explain
    nestling serve runs/default/exports/tiny --port 8000             # http://127.0.0.1:8000
    NESTLING_API_KEY=s3cret nestling serve runs/default/exports/tiny  # /v1/* then needs the key

Engine libraries, fastapi and uvicorn load inside the handlers, so `nestling --help` stays fast.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nestling.serve.config import add_config_args, check, config_from_args
from nestling.serve.errors import NestlingError

if TYPE_CHECKING:
    from nestling.serve.runtime import Answer

ENGINE_CHOICES = ["auto", "gguf", "onnx"]
MARKS = {True: "\u2713", False: "\u2717", None: "\u00b7"}


@dataclass
class AskConfig:
    explain: bool = field(default=True, metadata={"help": "steps then the answer; --no-explain: answer only"})
    max_tokens: int = field(default=256, metadata={"help": "generation budget in tokens"})
    engine: str = field(default="auto", metadata={"help": "auto | gguf | onnx", "choices": ENGINE_CHOICES})
    variant: str | None = field(default=None, metadata={"help": "manifest variant; default: the export's"})
    threads: int = field(default=1, metadata={"help": "engine threads (1 is often fastest for tiny models)"})

    def __post_init__(self) -> None:
        check(self.max_tokens >= 1, f"--max-tokens {self.max_tokens}: must be >= 1, e.g. 256")
        check(self.threads >= 1, f"--threads {self.threads}: must be >= 1")


def register(sub: argparse._SubParsersAction) -> None:
    ask = sub.add_parser("ask", help="answer one question with an exported reasoner: steps, answer, latency")
    ask.add_argument("dir", help="export directory (runs/NAME/exports/STUDENT)")
    ask.add_argument("question", help="the question, quoted")
    add_config_args(ask, AskConfig)
    ask.set_defaults(func=_cmd_ask)

    srv = sub.add_parser(
        "serve",
        help="serve an exported reasoner over HTTP (answer, OpenAI-compatible chat, metrics, a page)",
        description="Settings not given here come from NESTLING_* environment variables (NESTLING_API_KEY, "
        "NESTLING_MAX_QUEUE, NESTLING_MAX_TOKENS_CAP, ...; see serve/settings.py).",
    )
    srv.add_argument("dir", nargs="?", default=None, help="export directory (default: NESTLING_MODEL_DIR)")
    srv.add_argument("--host", default=None, help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    srv.add_argument("--engine", default=None, choices=ENGINE_CHOICES, help="engine (default auto)")
    srv.add_argument("--variant", default=None, help="manifest variant (default: the export's default)")
    srv.add_argument("--threads", type=int, default=None, help="engine threads (default 1)")
    srv.set_defaults(func=_cmd_serve)


def format_answer(a: Answer) -> str:
    """Steps with marks (✓ checks out, ✗ a calculation is wrong, · nothing to check), answer, latency."""
    lines = [f"  {MARKS[s.ok]} Step {i}: {s.text}" for i, s in enumerate(a.steps, 1)]
    lines.append(f"Answer: {a.answer if a.answer is not None else '(none)'}")
    lat = a.latency
    cut = ", cut at --max-tokens" if a.finish_reason == "length" else ""
    lines.append(
        f"latency: first token {1000 * lat.ttft_s:.1f} ms, total {1000 * lat.total_s:.1f} ms, "
        f"{lat.prompt_tokens} prompt + {lat.completion_tokens} completion tokens, "
        f"{lat.tokens_per_s:,.0f} tokens/s ({lat.variant} on {lat.engine}){cut}"
    )
    return "\n".join(lines)


def _cmd_ask(args: argparse.Namespace) -> int:
    from nestling.serve.runtime import Reasoner

    cfg = config_from_args(AskConfig, args)
    with Reasoner.load(args.dir, engine=cfg.engine, variant=cfg.variant, n_threads=cfg.threads) as r:
        print(format_answer(r.ask(args.question, explain=cfg.explain, max_tokens=cfg.max_tokens)))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from nestling.serve.manifest import read_manifest
    from nestling.serve.runtime import Reasoner
    from nestling.serve.settings import load_settings

    s = load_settings(
        model_dir=args.dir, host=args.host, port=args.port, engine=args.engine, variant=args.variant,
        threads=args.threads,
    )  # fmt: skip
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
