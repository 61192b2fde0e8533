"""`nestling traces | train | eval | distill`: distill's subcommands. Heavy imports stay inside handlers."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    _register_traces(sub)
    _register_train(sub)


def _register_traces(sub: argparse._SubParsersAction) -> None:
    """Owner: traces stage (issue 2)."""
    from nestling.distill.traces import TracesConfig
    from nestling.serve.config import add_config_args

    p = sub.add_parser(
        "traces",
        help="a teacher writes k rationales per question; verified ones are kept (resumable)",
        description="Generate, verify and filter teacher rationales into RUN/traces/. Kill it any time and "
        "re-run the same command to continue.",
    )
    add_config_args(p, TracesConfig)
    p.set_defaults(func=_cmd_traces)


def _cmd_traces(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from nestling.distill.traces import TracesConfig, run_traces
    from nestling.serve.config import config_from_args

    out = run_traces(config_from_args(TracesConfig, args))
    card = json.loads((out / "datacard.json").read_text())
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    table = Table(title=f"traces: {out}", show_header=False)
    q = card["questions"]
    table.add_row("teacher", f"{card['teacher']['spec']} ({card['teacher']['params'] or '?'} params)")
    table.add_row("questions", f"{q['train']} train + {q['heldout']} held-out (asked {q['requested']})")
    table.add_row(
        "rationales", f"{card['records']} ({card['sampling']['samples_per_question']} per question)"
    )
    table.add_row(
        "right answers",
        f"{pct(card['sample_accuracy'])} of samples; {pct(card['questions_any_correct'])} "
        "of questions have one",
    )
    base = card["trivial_baseline"]
    always = ", ".join(repr(a) for a in base["answers"].values()) or "-"
    table.add_row(
        "trivial baseline",
        f"always {always}: {pct(base['train_accuracy'])} of train, {pct(base['heldout_accuracy'])} held-out",
    )
    for f in card["filters"]:
        table.add_row(f"filter {f['name']}", f"{f['kept']}/{f['in']} kept ({pct(f['yield'])})")
    table.add_row("right answer, wrong steps", f"{card['right_answer_wrong_steps']} removed")
    table.add_row(
        "kept",
        f"{card['kept']} rationales; {card['questions_covered']} questions "
        f"({pct(card['coverage'])} of train)",
    )
    t = card["time"]
    table.add_row(
        "time",
        f"{t['teacher_seconds']:.0f} s teacher; {card['rationales_per_s'] or 0:.2f} rationales/s, "
        f"{card['tokens_per_s'] or 0:.0f} tokens/s",
    )
    Console().print(table)
    return 0


def _register_train(sub: argparse._SubParsersAction) -> None:
    """Owner: student stage (issue 3): `train`, `eval`, `distill`."""
    from nestling.distill.evaluate import EvalConfig
    from nestling.distill.pipeline import DistillConfig
    from nestling.distill.train import TrainConfig
    from nestling.serve.config import add_config_args

    p = sub.add_parser("train", help="train one student on a run directory's verified traces")
    add_config_args(p, TrainConfig)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="teacher, trivial baseline and students on the held-out split")
    add_config_args(p, EvalConfig)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("distill", help="traces -> train each student -> eval, resumable; prints the table")
    add_config_args(p, DistillConfig)
    p.set_defaults(func=_cmd_distill)


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from nestling.distill.accel import configure_openmp, is_main_process
    from nestling.serve.config import config_from_args

    configure_openmp()  # before torch loads OpenMP
    from nestling.distill.train import TrainConfig, train

    out = train(config_from_args(TrainConfig, args))
    if not is_main_process():
        return 0
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    print(
        f"{out / 'model'}: {m['params'] / 1e6:.2f}M parameters, {m['steps']} steps, final loss "
        f"{m['final_loss']}, {m['train_tokens_per_s']:,.0f} train tokens/s"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from nestling.distill.evaluate import EvalConfig, evaluate
    from nestling.serve.config import config_from_args

    result = evaluate(config_from_args(EvalConfig, args))
    print(result["table"], end="")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from nestling.serve.config import config_from_args

    result = run_distill(config_from_args(DistillConfig, args))
    print(result["table"], end="")
    return 0


from nestling.distill.pipeline import DistillConfig, run_distill  # noqa: E402  (re-exported for nestling.run)
