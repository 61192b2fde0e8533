"""nestling's command line: one map from each command to its config dataclass and its main function.

    nestling run --out runs/default           # traces -> train -> eval -> export -> report
    nestling traces --task rg:basic_arithmetic --teacher gguf:smollm2 --samples 4 --n 200 --out runs/x
    nestling serve runs/default/exports/tiny  # http://127.0.0.1:8000

Every subcommand's flags are generated from its config's fields (help, type, default), so a config and its
command line cannot drift apart. Configs and mains are named as "module:attribute" and imported only when a
command needs them: `nestling serve` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestling.serve.errors import NestlingError


@dataclass(frozen=True)
class Command:
    """One subcommand: ``main(config)`` runs it and returns the exit code."""

    help: str
    config: str  # "module:Class": a dataclass (flags via add_config_args) or serve's pydantic Settings
    main: str  # "module:function"
    description: str | None = None
    torch: bool = False  # trains or evaluates with torch here: OpenMP's wait policy is set before it loads
    # The config field naming the directory this command writes: held under its writer lock (serve.lock)
    # for the command's life, and --wait waits for another writer instead of refusing.
    writes: str | None = None
    lock: str = "creates"  # "creates" the directory | "needs" it to exist | "reads" when locked | "export"


COMMANDS: dict[str, Command] = {
    "traces": Command(
        "a teacher writes k rationales per question; verified ones are kept (resumable)",
        "nestling.distill.traces:TracesConfig",
        "nestling.distill.cli:traces_main",
        "Generate, verify and filter teacher rationales into RUN/traces/. Kill it any time and re-run the "
        "same command to continue.",
        writes="out",
    ),
    "train": Command(
        "train one student on a run directory's verified traces (torchrun / accelerate launch: one job)",
        "nestling.distill.train:TrainConfig",
        "nestling.distill.cli:train_main",
        torch=True,
        writes="run",
        lock="needs",
    ),
    "eval": Command(
        "teacher, trivial baseline and students on the held-out split",
        "nestling.distill.evaluate:EvalConfig",
        "nestling.distill.cli:eval_main",
        torch=True,
        writes="run",
        lock="reads",
    ),
    "distill": Command(
        "traces -> train each student -> eval, resumable; prints the table",
        "nestling.distill.pipeline:DistillConfig",
        "nestling.distill.cli:distill_main",
        torch=True,
        writes="out",
    ),
    "compress": Command(
        "a compact student from a trained one: vocabulary trimmed to the task, layers pruned by measured "
        "importance, recovered by logit distillation",
        "nestling.distill.compress:CompressConfig",
        "nestling.distill.cli:compress_main",
        torch=True,
        writes="run",
        lock="needs",
    ),
    "export": Command(
        "ONNX (fp32, int8) + GGUF (f16, Q8_0, Q4_K_M) of a student, parity-checked against PyTorch",
        "nestling.export.pipeline:ExportConfig",
        "nestling.export.cli:export_main",
        "Export a student and check every artifact against PyTorch on held-out prompts. Writes OUT.tmp-* and "
        "renames it to OUT when complete; fails (exit 2, nothing left) when an unquantized artifact does not "
        "match.",
        writes="out",
        lock="export",
    ),
    "ask": Command(
        "answer a question (or a JSONL file of them) with an exported reasoner: steps, answer, latency",
        "nestling.serve.cli:AskConfig",
        "nestling.serve.cli:ask_main",
    ),
    "serve": Command(
        "serve an exported reasoner over HTTP (answer, OpenAI-compatible chat, metrics, a page)",
        "nestling.serve.settings:Settings",
        "nestling.serve.cli:serve_main",
        "Every flag is also an environment variable (--max-queue: NESTLING_MAX_QUEUE); a flag wins. Pass the "
        "API key as NESTLING_API_KEY rather than --api-key (flags show in `ps`).",
    ),
    "run": Command(
        "the one command: traces -> train -> eval -> export -> answer timings -> report",
        "nestling.run:RunConfig",
        "nestling.cli:run_main",
        torch=True,
        writes="out",
    ),
}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _is_settings(cls: type) -> bool:
    return hasattr(cls, "model_fields")  # serve's pydantic Settings: flags fall back to NESTLING_* variables


def build_parser() -> argparse.ArgumentParser:
    from nestling.serve.config import add_config_args
    from nestling.serve.settings import add_settings_args

    parser = argparse.ArgumentParser(
        prog="nestling",
        description="Distil a big model's chain-of-thought into a small reasoner, export it, serve it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        cls = _load(cmd.config)
        if _is_settings(cls):
            p.add_argument("model_dir", nargs="?", metavar="DIR", help="export dir (or NESTLING_MODEL_DIR)")
            add_settings_args(p, skip=("model_dir",))
        else:
            add_config_args(p, cls)
        if cmd.writes:
            p.add_argument(
                "--wait",
                action="store_true",
                help="when another nestling process is writing the same directory, wait for it to finish "
                "(default: exit 2 naming it)",
            )
    return parser


def _config(cmd: Command, args: argparse.Namespace) -> Any:
    from nestling.serve.config import config_from_args
    from nestling.serve.settings import settings_from_args

    cls = _load(cmd.config)
    return settings_from_args(args) if _is_settings(cls) else config_from_args(cls, args)


def _writer_lock(cmd: Command, cfg: Any, wait: bool) -> AbstractContextManager:
    """The lock on the directory `cmd` writes; eval reads without it while another process writes."""
    if not cmd.writes:
        return nullcontext()
    from nestling.serve.lock import locked_by_another, writer_lock

    directory = getattr(cfg, cmd.writes)
    if cmd.lock == "reads" and not wait and locked_by_another(directory):
        return nullcontext()  # evaluate() sees the holder and writes nothing
    create = cmd.lock not in ("needs", "reads")
    return writer_lock(directory, wait=wait, export=cmd.lock == "export", create=create)


def run_main(cfg: Any) -> int:
    from nestling.run import run

    report = run(cfg)
    if report:  # ranks other than 0 under a launcher only train
        print(Path(report["paths"]["md"]).read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    cmd = COMMANDS[args.command]
    try:
        if cmd.torch:
            from nestling.distill.accel import configure_openmp

            configure_openmp()  # before torch (and its OpenMP) loads
        cfg = _config(cmd, args)
        with _writer_lock(cmd, cfg, getattr(args, "wait", False)):
            return int(_load(cmd.main)(cfg) or 0)
    except NestlingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: keep the traceback one flag away
        if args.verbose or os.environ.get("NESTLING_DEBUG"):
            raise
        print(
            f"error: unexpected {type(e).__name__}: {e} (re-run with -v for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
