"""nestling: distil a big model's chain-of-thought into a small reasoner, export it, serve it.

    nestling run --out runs/default           # traces -> train -> eval -> export -> report
    nestling traces --task rg:basic_arithmetic --teacher gguf:smollm2 --samples 4 --n 200 --out runs/x
    nestling serve runs/default/exports/tiny  # http://127.0.0.1:8000

The only module that imports all three stages. Each stage's ``cli.py`` registers its own subcommands and
imports its heavy dependencies inside the handlers, so ``nestling serve`` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nestling.serve.errors import NestlingError

log = logging.getLogger("nestling")


def build_parser() -> argparse.ArgumentParser:
    from nestling.distill import cli as distill_cli
    from nestling.export import cli as export_cli
    from nestling.serve import cli as serve_cli

    parser = argparse.ArgumentParser(prog="nestling", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    distill_cli.register(sub)
    export_cli.register(sub)
    serve_cli.register(sub)
    _register_run(sub)
    return parser


def _register_run(sub: argparse._SubParsersAction) -> None:
    from nestling.run import RunConfig
    from nestling.serve.config import add_config_args

    p = sub.add_parser("run", help="the one command: traces -> train -> eval -> export -> report")
    add_config_args(p, RunConfig)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from nestling.run import RunConfig, run
    from nestling.serve.config import config_from_args

    report = run(config_from_args(RunConfig, args))
    print(Path(report["paths"]["md"]).read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
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
