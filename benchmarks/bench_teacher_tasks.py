"""Which tasks the bundled teacher can sometimes solve, and what adaptive sampling saves against a flat k.

    python3 benchmarks/bench_teacher_tasks.py --n 96 --heldout 16 --k 8            # the candidate tasks below
    python3 benchmarks/bench_teacher_tasks.py --task 'rg:chain_sum?min_terms=4&max_terms=4' --k 8
    python3 benchmarks/bench_teacher_tasks.py --set multistep --n 28 --heldout 4 --k 8   # one task each
    python3 benchmarks/bench_teacher_tasks.py --set default --adaptive --k 6 --n 72 --heldout 8  # as run does

For each task: one traces run with a flat k samples per training question (nestling traces, the teacher's
few-shot prompt, temperature 0.7), then, read off the same records (sample j has seed + j whichever way it
is drawn): coverage (questions with a verified rationale) after 1..k samples, the share of samples right,
and the teacher tokens adaptive sampling (a question stops at its first verified rationale) spends to reach
the flat k's coverage. The traces stage is resumable, so a killed benchmark re-run continues. Results are
merged into benchmarks/results/teacher_tasks.json by task name (each with its own n, k and threads), and a
coverage-vs-tokens PNG of every task in it is drawn beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

ONE_DIGIT = "min_digits=1&max_digits=1"
BASIC = "operators=+,-,*&allow_parentheses=false&allow_negation=false"
CANDIDATES = {
    "two terms (today's default)": None,  # the default mix's easy half (distill.tasks.EASY_PARTS)
    "three terms": f"mix:rg:basic_arithmetic?min_terms=3&max_terms=3&{ONE_DIGIT}&{BASIC},"
    f"rg:chain_sum?min_terms=3&max_terms=3&{ONE_DIGIT}",
}
# Candidates for the multi-step share of the default mix, measured one at a time.
MULTISTEP = {
    "basic_arithmetic 3 terms +-* (precedence)": "rg:basic_arithmetic?min_terms=3&max_terms=3"
    f"&{ONE_DIGIT}&{BASIC}",
    "basic_arithmetic 3 terms +-": f"rg:basic_arithmetic?min_terms=3&max_terms=3&{ONE_DIGIT}"
    "&operators=+,-&allow_parentheses=false&allow_negation=false",
    "chain_sum 3 terms": f"rg:chain_sum?min_terms=3&max_terms=3&{ONE_DIGIT}",
    "chain_sum 2 two-digit terms": "rg:chain_sum?min_terms=2&max_terms=2&min_digits=2&max_digits=2",
}
SETS = {"candidates": CANDIDATES, "multistep": MULTISTEP, "default": {"default mix": "DEFAULT"}}


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"model": model or platform.processor(), "avx512": "avx512f" in flags}


def measure(task: str, out: Path, args: argparse.Namespace) -> dict:
    from nestling.distill.traces import TracesConfig, run_traces

    sizes = {"n": args.n, "heldout": args.heldout, "out": str(out), "threads": args.threads}
    if args.adaptive:  # what a run spends: rounds over the unsolved questions, up to k each
        cfg = TracesConfig(task=task, samples=max(1, args.k // 2), adaptive=True, max_samples=args.k, **sizes)
    else:
        cfg = TracesConfig(task=task, samples=args.k, **sizes)
    t0 = time.perf_counter()
    traces = run_traces(cfg, progress=True)
    card = json.loads((traces / "datacard.json").read_text())
    cost = card["sampling_cost"]
    flat = cost["curve"][-1]
    first = next(p for p in cost["curve"] if p["coverage"] >= flat["coverage"])
    return {
        "task": task,
        "train_questions": card["questions"]["train"],
        "sample_accuracy": card["sample_accuracy"],
        "coverage_curve": cost["curve"],
        "pass_at_1": cost["curve"][0]["coverage"],
        f"pass_at_{args.k}": flat["coverage"],
        "flat_k": args.k,
        "flat_tokens": flat["tokens_flat"],
        "adaptive_tokens_at_flat_coverage": flat["tokens_adaptive"],
        "adaptive_token_share": cost["adaptive_token_share"],
        "flat_samples_for_that_coverage": first["samples_per_question"],
        "rationales_per_s": card.get("rationales_per_s"),
        "mean_tokens": card.get("mean_tokens"),
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "teacher_seconds": card["time"]["teacher_seconds"],
        "n": args.n,
        "heldout": args.heldout,
        "threads": args.threads,
        "mode": "adaptive" if args.adaptive else "flat",
        "coverage": card["coverage"],
        "coverage_by_task": card.get("coverage_by_task"),
        "samples_drawn": card["records"],
        "teacher_tokens": card["time"]["tokens"],
        **({"adaptive": card["adaptive"]} if args.adaptive else {}),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in results.items():
        cov = [p["coverage"] for p in r["coverage_curve"]]
        ax.plot([p["tokens_flat"] for p in r["coverage_curve"]], cov, "o-", label=f"{name}, flat")
        ax.plot([p["tokens_adaptive"] for p in r["coverage_curve"]], cov, "s--", label=f"{name}, adaptive")
    ax.set_xlabel("teacher tokens")
    ax.set_ylabel("training questions with a verified rationale")
    ax.set_title("Coverage against teacher tokens, k = 1..K")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from nestling.distill.tasks import DEFAULT_TASK, EASY_PARTS

    from nestling.core.manifest import fingerprint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", action="append", help="task spec (repeatable; default: --set's tasks)")
    ap.add_argument("--set", default="candidates", choices=SETS, help="named tasks to measure")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adaptive", action="store_true", help="sample adaptively up to --k (as `run` does)")
    ap.add_argument("--work", default="runs/bench_teacher_tasks")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_tasks.json"))
    args = ap.parse_args()
    named = SETS[args.set]
    easy = "mix:" + ",".join(EASY_PARTS)
    named = {k: DEFAULT_TASK if v == "DEFAULT" else v or easy for k, v in named.items()}
    tasks = {t: t for t in args.task} if args.task else named
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    results = dict(old.get("tasks", {}))
    for name, task in tasks.items():
        # The work directory is named by the task spec and sizes, so a re-run resumes the same traces.
        work = Path(args.work) / f"{fingerprint([task, args.n, args.heldout, args.k, args.adaptive])[:12]}"
        name = f"{name} (adaptive up to {args.k})" if args.adaptive else name
        results[name] = measure(task, work, args)
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "coverage_curve"}}, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu": cpu(), "teacher": "gguf:smollm2"}
        out.write_text(json.dumps({**old, **meta, "tasks": results}, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
