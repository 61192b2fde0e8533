"""nestling's command line: one map from each command to its config dataclass and its main function.

    nestling run --run runs/default           # traces -> train -> eval -> export -> report
    nestling traces --task rg:basic_arithmetic --teacher gguf:smollm2 --samples 4 --n 200 --run runs/x
    nestling serve runs/default/exports/tiny  # http://127.0.0.1:8000

Every subcommand's flags are generated from its config's fields (help, type, default), so a config and its
command line cannot drift apart. Configs and mains are named as "module:attribute" and imported only when a
command needs them: only the chosen command's config module is imported, so `nestling --help` needs no extra,
`nestling serve` never loads torch, and a command whose extra is missing says which one to install.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestling.core.errors import NestlingError

_TRAIN = ("torch", "transformers", "safetensors", "reasoning_gym")
_EXPORT = (*_TRAIN, "optimum.onnxruntime", "onnx", "gguf", "llama_cpp")


@dataclass(frozen=True)
class Command:
    """One subcommand: ``main(config)`` runs it and returns the exit code."""

    help: str
    config: str  # "module:Class": a dataclass (flags via add_config_args) or serve's pydantic Settings
    main: str  # "module:function"
    description: str | None = None
    torch: bool = False  # trains or evaluates with torch here: OpenMP's wait policy is set before it loads
    extra: str = "train"  # the pip extra its config and main need: named when an import is missing
    settings: bool = False  # the config is serve's pydantic Settings: flags fall back to NESTLING_* variables
    needs: tuple[str, ...] = _TRAIN  # modules checked before any work starts: a missing one names `extra`
    # The config field naming the directory this command writes: held under its writer lock (core.lock)
    # for the command's life, and --wait waits for another writer instead of refusing.
    writes: str | None = None
    lock: str = "creates"  # "creates" the directory | "needs" it to exist | "reads" when locked | "export"
    # The config field naming the run directory: spelled --run in every command, whatever the field's
    # name (the field's own spelling, e.g. --out, stays an alias so older command lines still work).
    run_dir: str | None = None


COMMANDS: dict[str, Command] = {
    "traces": Command(
        "a teacher writes k rationales per question; verified ones are kept (resumable)",
        "nestling.distill.traces:TracesConfig",
        "nestling.distill.cli:traces_main",
        "Generate, verify and filter teacher rationales into RUN/traces/. Kill it any time and re-run the "
        "same command to continue.",
        needs=("reasoning_gym", "openai", "jinja2"),
        writes="out",
        run_dir="out",
    ),
    "train": Command(
        "train one student on a run directory's verified traces (torchrun / accelerate launch: one job)",
        "nestling.distill.train:TrainConfig",
        "nestling.distill.cli:train_main",
        torch=True,
        writes="run",
        lock="needs",
        run_dir="run",
    ),
    "eval": Command(
        "teacher, trivial baseline and students on the held-out split",
        "nestling.distill.evaluate:EvalConfig",
        "nestling.distill.cli:eval_main",
        torch=True,
        writes="run",
        lock="reads",
        run_dir="run",
    ),
    "distill": Command(
        "traces -> train each student -> eval, resumable; prints the table",
        "nestling.distill.pipeline:DistillConfig",
        "nestling.distill.cli:distill_main",
        torch=True,
        writes="out",
        run_dir="out",
    ),
    "compress": Command(
        "a compact student from a trained one: vocabulary trimmed to the task, layers pruned by measured "
        "importance, recovered by logit distillation",
        "nestling.distill.compress:CompressConfig",
        "nestling.distill.cli:compress_main",
        torch=True,
        writes="run",
        lock="needs",
        run_dir="run",
    ),
    "export": Command(
        "ONNX (fp32, int8) + GGUF (f16, Q8_0, Q4_K_M) of a student, parity-checked against PyTorch",
        "nestling.export.pipeline:ExportConfig",
        "nestling.export.cli:export_main",
        "Export a student and check every artifact against PyTorch on held-out prompts. Writes OUT.tmp-* and "
        "renames it to OUT when complete; fails (exit 2, nothing left) when an unquantized artifact does not "
        "match.",
        extra="train,onnx,gguf",
        needs=_EXPORT,
        writes="out",
        lock="export",
    ),
    "ask": Command(
        "answer a question (or a JSONL file of them) with an exported reasoner: steps, answer, latency",
        "nestling.serve.cli:AskConfig",
        "nestling.serve.cli:ask_main",
        extra="serve",
        needs=(),  # the export's engine names its own library (onnxruntime or llama_cpp) when it loads
    ),
    "serve": Command(
        "serve an exported reasoner over HTTP (answer, OpenAI-compatible chat, metrics, a page)",
        "nestling.serve.settings:Settings",
        "nestling.serve.cli:serve_main",
        "Every flag is also an environment variable (--max-queue: NESTLING_MAX_QUEUE); a flag wins. Pass the "
        "API key as NESTLING_API_KEY rather than --api-key (flags show in `ps`).",
        extra="serve",
        settings=True,
        needs=("fastapi", "uvicorn", "pydantic_settings", "prometheus_client", "sse_starlette"),
    ),
    "run": Command(
        "the one command: traces -> train -> eval -> export -> answer timings -> report",
        "nestling.run:RunConfig",
        "nestling.cli:run_main",
        torch=True,
        extra="train,onnx,gguf",
        needs=_EXPORT,
        writes="out",
        run_dir="out",
    ),
}


def _load(ref: str, extra: str | None = None) -> Any:
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        if extra is None or (e.name or "").split(".")[0] == "nestling":
            raise
        raise NestlingError(missing_extra(e.name or module, extra)) from None


def missing_extra(package: str, extra: str) -> str:
    return f"{package} is not installed; the command needs [{extra}] extra; pip install 'nestling[{extra}]'"


def _absent(modules: Sequence[str]) -> str | None:
    """The first of ``modules`` that cannot be imported here, found without importing any of them."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:  # a dotted name whose parent is missing
            return name
    return None


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not a global flag), if it is one of ours."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command is listed, but only the one ``argv`` names gets its flags, so
    only that command's config module is imported."""
    parser = argparse.ArgumentParser(
        prog="nestling",
        description="Distil a big model's chain-of-thought into a small reasoner, export it, serve it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        if name == chosen:
            _add_command_args(p, cmd)
        if cmd.writes:
            p.add_argument(
                "--wait",
                action="store_true",
                help="when another nestling process is writing the same directory, wait for it to finish "
                "(default: exit 2 naming it)",
            )
    return parser


def _add_command_args(p: argparse.ArgumentParser, cmd: Command) -> None:
    from nestling.core.config import add_config_args

    if cmd.settings:  # pydantic: the [serve] extra
        add_settings_args = _load("nestling.serve.settings:add_settings_args", cmd.extra)
        p.add_argument("model_dir", nargs="?", metavar="DIR", help="export dir (or NESTLING_MODEL_DIR)")
        add_settings_args(p, skip=("model_dir",))
    else:
        flags = {cmd.run_dir: tuple(dict.fromkeys(("--run", f"--{cmd.run_dir}")))} if cmd.run_dir else None
        add_config_args(p, _load(cmd.config, cmd.extra), flags=flags)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return build_parser(argv).parse_args(argv)


def _config(cmd: Command, args: argparse.Namespace) -> Any:
    from nestling.core.config import config_from_args

    if cmd.settings:
        return _load("nestling.serve.settings:settings_from_args", cmd.extra)(args)
    return config_from_args(_load(cmd.config, cmd.extra), args)


def _writer_lock(cmd: Command, cfg: Any, wait: bool) -> AbstractContextManager:
    """The lock on the directory `cmd` writes; eval reads without it while another process writes."""
    if not cmd.writes:
        return nullcontext()
    from nestling.core.lock import locked_by_another, writer_lock

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
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except NestlingError as e:  # the chosen command's extra is not installed
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    cmd = COMMANDS[args.command]
    if absent := _absent(cmd.needs):
        print(f"error: {missing_extra(absent, cmd.extra)}", file=sys.stderr)
        return 2
    try:
        if cmd.torch:
            from nestling.distill.accel import configure_openmp

            configure_openmp()  # before torch (and its OpenMP) loads
        cfg = _config(cmd, args)
        with _writer_lock(cmd, cfg, getattr(args, "wait", False)):
            return int(_load(cmd.main, cmd.extra)(cfg) or 0)
    except NestlingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a library the stage imports when it starts work
        if (e.name or "nestling").split(".")[0] == "nestling":
            raise
        print(f"error: {missing_extra(e.name or '?', cmd.extra)}", file=sys.stderr)
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
