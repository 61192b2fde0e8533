"""`nestling traces | train | eval | distill`: what distill's commands print. The command map (flags from each
config dataclass) is the root's cli.py; heavy imports stay inside these functions."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nestling.distill.compress import CompressConfig
    from nestling.distill.evaluate import EvalConfig
    from nestling.distill.pipeline import DistillConfig
    from nestling.distill.traces import TracesConfig
    from nestling.distill.train import TrainConfig


def traces_main(cfg: TracesConfig) -> int:
    """Run the traces stage and print its data card."""
    import json

    from nestling.distill.traces import run_traces
    from rich.console import Console
    from rich.table import Table

    out = run_traces(cfg)
    card = json.loads((out / "datacard.json").read_text())
    table = Table(title=f"traces: {out}", show_header=False)
    for name, value in [*_sample_rows(card), *_kept_rows(card), *_cost_rows(card)]:
        table.add_row(name, value)
    Console().print(table)
    return 0


Rows = list[tuple[str, str]]


def _sample_rows(card: dict) -> Rows:
    """The data card's teacher, questions, samples and what was wrong with them."""
    from nestling.core.fmt import pct

    q, sampling = card["questions"], card["sampling"]
    per_q = (
        f"adaptive, up to {sampling['max_samples_per_question']}"
        if sampling.get("adaptive")
        else sampling["samples_per_question"]
    )
    base = card["trivial_baseline"]
    always = ", ".join(repr(a) for a in base["answers"].values()) or "-"
    rows = [
        ("teacher", f"{card['teacher']['spec']} ({card['teacher']['params'] or '?'} params)"),
        ("questions", f"{q['train']} train + {q['heldout']} held-out (asked {q['requested']})"),
        ("rationales", f"{card['records']} ({per_q} per question)"),
        (
            "right answers",
            f"{pct(card['sample_accuracy'])} of samples; {pct(card['questions_any_correct'])} "
            "of questions have one",
        ),
        (
            "trivial baseline",
            f"always {always}: {pct(base['train_accuracy'])} of train, "
            f"{pct(base['heldout_accuracy'])} held-out",
        ),
    ]
    rows += [
        (f"filter {f['name']}", f"{f['kept']}/{f['in']} kept ({pct(f['yield'])})") for f in card["filters"]
    ]
    rows.append(("right answer, wrong steps", f"{card['right_answer_wrong_steps']} removed"))
    calc = card.get("calculator")
    if calc:
        rows.append(
            (
                "calculator",
                f"{calc['corrections']} false results replaced in {calc['rationales_corrected']} rationales "
                f"({calc['right_answer_corrected']} of them with the right answer)",
            )
        )
    chains = {k: v for k, v in (card.get("chains") or {}).items() if v and k != "none"}
    if chains:
        rows.append(("chains", ", ".join(f"{v} in {k}" for k, v in chains.items())))
    bad = {k: card.get(k) or 0 for k in ("truncated", "no_final_answer", "unclosed_think")}
    rows.append(("bad output", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in bad.items())))
    errors = card.get("teacher_errors") or {}
    if errors.get("samples_missing"):
        failed = (
            ", ".join(f"{v} {k}" for k, v in errors["failed_requests_last_run"].items()) or "none this run"
        )
        rows.append(
            ("failed requests", f"{failed}; {errors['samples_missing']} samples missing: re-run to retry")
        )
    return rows


def _kept_rows(card: dict) -> Rows:
    """What the filters kept, overall and by task."""
    from nestling.core.fmt import pct

    rows = [
        (
            "kept",
            f"{card['kept']} rationales; {card['questions_covered']} questions "
            f"({pct(card['coverage'])} of train)",
        )
    ]
    by_task = card.get("coverage_by_task") or {}
    if len(by_task) > 1:
        rows.append(
            (
                "kept by task",
                "; ".join(
                    f"{pct(v['coverage'])} of {v['train']} {_short_task(k)}" for k, v in by_task.items()
                ),
            )
        )
    return rows


def _cost_rows(card: dict) -> Rows:
    """Adaptive sampling, teacher tokens against a flat k, the coverage curve and the time."""
    from nestling.core.fmt import pct

    rows: Rows = []
    ad, cost = card.get("adaptive"), card.get("sampling_cost") or {}
    if ad:
        rows.append(
            (
                "adaptive",
                f"{ad['questions_solved']} solved, {ad['questions_never_solved']} never solved in "
                f"{ad['max_samples']} samples, {ad['questions_unfinished']} unfinished (stopped by "
                f"{ad['stopped_by'].replace('_', ' ')})",
            )
        )
    same = cost.get("flat_same_coverage") or {}
    if same.get("adaptive_token_share") is not None:
        rows.append(
            (
                "teacher tokens",
                f"{cost['adaptive']['tokens']:,} adaptive vs {same['tokens']:,} for the flat k={same['k']} "
                f"that reaches the same coverage ({pct(same['adaptive_token_share'])})"
                + ("" if ad else "; adaptive simulated from these samples"),
            )
        )
    if cost.get("curve"):
        curve = "  ".join(f"k={p['samples_per_question']} {pct(p['coverage'])}" for p in cost["curve"])
        rows.append(("coverage curve", curve + "  (coverage.png)"))
    t = card["time"]
    rows.append(
        (
            "time",
            f"{t['teacher_seconds']:.0f} s teacher; {card['rationales_per_s'] or 0:.2f} rationales/s, "
            f"{card['tokens_per_s'] or 0:.0f} tokens/s",
        )
    )
    return rows


def _short_task(spec: str) -> str:
    """rg:chain_sum?min_terms=3&max_terms=3&... -> rg:chain_sum (3 terms): tells a mix's parts apart."""
    name, _, query = spec.partition("?")
    terms = re.search(r"(?:^|&)max_terms=(\d+)", query)
    return f"{name} ({terms.group(1)} terms)" if terms else name


def train_main(cfg: TrainConfig) -> int:
    """Train one student; rank 0 prints its size, steps, loss and speed."""
    from nestling.distill.accel import is_main_process
    from nestling.distill.train import train

    from nestling.core.manifest import read_manifest

    out = train(cfg)
    if not is_main_process():
        return 0
    m = read_manifest(out)["metrics"]
    print(
        f"{out / 'model'}: {m['params'] / 1e6:.2f}M parameters, {m['steps']} steps, final loss "
        f"{m['final_loss']}, {m['train_tokens_per_s']:,.0f} train tokens/s"
    )
    return 0


def eval_main(cfg: EvalConfig) -> int:
    from nestling.distill.evaluate import evaluate

    print(evaluate(cfg)["table"], end="")
    return 0


def distill_main(cfg: DistillConfig) -> int:
    from nestling.distill.pipeline import run_distill

    print(run_distill(cfg)["table"], end="")  # empty on ranks other than 0
    return 0


def compress_main(cfg: CompressConfig) -> int:
    """Trim, prune and recover a compact student; print its size against its source."""
    from nestling.distill.compress import compress

    from nestling.core.manifest import read_manifest

    out = compress(cfg)
    m = read_manifest(out)["metrics"]
    print(
        f"{out / 'model'}: {m['params'] / 1e6:.2f}M parameters ({m['param_ratio']:.2f}x its source), "
        f"vocabulary {m['vocab']}, layers {m['layers_kept']}; evaluate it with "
        f"`nestling eval --run {cfg.run} --students {cfg.name}`"
    )
    return 0
