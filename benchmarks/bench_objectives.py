"""Distilling Step-by-Step on this toolkit: multitask and cot vs answer-only, several seeds, equal data and
equal compute; plus training throughput per student. JSON + PNG out.

    python3 benchmarks/bench_objectives.py --run runs/x --out benchmarks/results/objectives \\
        --student tiny --seeds 0 1 2 --epochs 4 --limit 100
    python3 benchmarks/bench_objectives.py --run runs/x --throughput tiny small "gguf:smollm2?keep_layers=12"

Needs a run directory with traces (``nestling traces`` or ``nestling distill``). Each arm trains a fresh
student in OUT/runs/<arm>-seed<s>/ (the traces are linked, not copied) and is evaluated on the held-out split
without the teacher (its accuracy is in RUN/eval.json already).

Equal data: every arm makes the same number of passes (--epochs) over its own examples (multitask has two
per row, so it takes twice the steps). Equal compute: every arm gets the training-token budget the cot arm
used at equal data, so answer-only (short targets) takes many more steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nestling.core.manifest import atomic_write_json  # noqa: E402

OBJECTIVES = ("answer-only", "cot", "multitask")


def _arm_run(out: Path, arm: str, source: Path) -> Path:
    run = out / "runs" / arm
    (run / "traces").mkdir(parents=True, exist_ok=True)
    for name in ("questions.jsonl", "kept.jsonl"):
        dst = run / "traces" / name
        if not dst.exists():
            os.symlink((source / "traces" / name).resolve(), dst)
    return run


def _examples_and_tokens(run: Path, student: str, objective: str) -> tuple[int, float]:
    """(examples, mean tokens per example) for an objective, with the student's tokenizer."""
    from nestling.distill.students import init_student
    from nestling.distill.train import build_examples, training_rows

    from nestling.core.prompting import explain_target, student_prompt

    rows = training_rows(run)
    texts = [student_prompt(r["question"]) + explain_target(list(r["steps"]), str(r["answer"])) for r in rows]
    _, tok = init_student(student, texts)
    ex = build_examples(rows, tok, objective, 0.5, 192)
    return len(ex), statistics.mean(len(e.ids) for e in ex)


def objectives(args: argparse.Namespace) -> dict:
    from nestling.distill.evaluate import EvalConfig, evaluate
    from nestling.distill.train import TrainConfig, train

    source, out = Path(args.run), Path(args.out)
    sizes = {o: _examples_and_tokens(source, args.student, o) for o in OBJECTIVES}
    cot_steps = math.ceil(args.epochs * sizes["cot"][0] / args.batch_size)
    budget = cot_steps * args.batch_size * sizes["cot"][1]  # training tokens of the cot arm at equal data
    plan = {}
    for o in OBJECTIVES:
        n, mean_tokens = sizes[o]
        plan[("equal-data", o)] = math.ceil(args.epochs * n / args.batch_size)
        plan[("equal-compute", o)] = math.ceil(budget / (args.batch_size * mean_tokens))
    results: dict = {"config": vars(args), "sizes": sizes, "arms": {}}
    for (setting, o), steps in plan.items():
        for seed in args.seeds:
            if setting == "equal-compute" and o == "cot":
                continue  # identical to cot at equal data by construction
            arm = f"{setting}-{o}-seed{seed}"
            run = _arm_run(out, arm, source)
            t0 = time.perf_counter()
            sdir = train(
                TrainConfig(
                    run=str(run),
                    student=args.student,
                    objective=o,
                    steps=steps,
                    seed=seed,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    warmup=min(30, steps // 5),
                    name="s",
                    threads=args.threads,
                    checkpoint_every=0,
                    progress=False,
                )
            )
            secs = time.perf_counter() - t0
            ev = evaluate(
                EvalConfig(
                    run=str(run),
                    students=["s"],
                    teacher="none",
                    limit=args.limit,
                    threads=args.threads,
                    progress=False,
                    latency_samples=0,
                )
            )
            s = ev["students"]["s"]
            metrics = json.loads((sdir / "manifest.json").read_text())["metrics"]
            results["arms"][arm] = {
                "setting": setting,
                "objective": o,
                "seed": seed,
                "steps": steps,
                "train_seconds": secs,
                "train_tokens": metrics["train_tokens"],
                "answer_acc": s["answer"]["accuracy"],
                "explain_acc": s["explain"]["accuracy"],
                "steps_all_right": s["explain"]["steps_all_right"],
                "baseline": ev["baseline"]["accuracy"],
            }
            print(arm, json.dumps(results["arms"][arm]), flush=True)
            atomic_write_json(out / "objectives.json", results)
    results["summary"] = _summarise(results["arms"])
    atomic_write_json(out / "objectives.json", results)
    _plot(results, out / "objectives.png")
    return results


def _summarise(arms: dict) -> dict:
    groups: dict = {}
    for a in arms.values():
        setting, o = a["setting"], a["objective"]
        if setting == "equal-data" and o == "cot":
            groups.setdefault(("equal-compute", "cot"), []).append(a)
        groups.setdefault((setting, o), []).append(a)
    out = {}
    for (setting, o), xs in sorted(groups.items()):
        for metric in ("answer_acc", "explain_acc"):
            vals = [x[metric] for x in xs]
            out.setdefault(setting, {}).setdefault(o, {})[metric] = {
                "mean": statistics.mean(vals),
                "stdev": statistics.pstdev(vals),
                "n": len(vals),
            }
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120, sharey=True)
    for ax, setting in zip(axes, ("equal-data", "equal-compute"), strict=True):
        xs = list(OBJECTIVES)
        for k, (metric, label) in enumerate((("answer_acc", "answer mode"), ("explain_acc", "explain mode"))):
            means = [100 * summary.get(setting, {}).get(o, {}).get(metric, {}).get("mean", 0) for o in xs]
            errs = [100 * summary.get(setting, {}).get(o, {}).get(metric, {}).get("stdev", 0) for o in xs]
            ax.bar([i + 0.4 * k for i in range(len(xs))], means, 0.4, yerr=errs, label=label, capsize=3)
        base = [a["baseline"] for a in results["arms"].values()]
        if base:
            ax.axhline(100 * base[0], ls="--", c="gray", label="trivial baseline")
        ax.set_xticks([i + 0.2 for i in range(len(xs))], xs)
        ax.set_title(f"{setting} ({results['config']['student']}, {len(results['config']['seeds'])} seeds)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def throughput(args: argparse.Namespace) -> dict:
    """Training tokens/s per student spec: a short multitask run each (first steps excluded by warm-up)."""
    from nestling.distill.train import TrainConfig, train

    source, out = Path(args.run), Path(args.out)
    res = {}
    for spec in args.throughput:
        run = _arm_run(
            out, "throughput-" + spec.replace("/", "_").replace("?", "_").replace("=", "_"), source
        )
        sdir = train(
            TrainConfig(
                run=str(run),
                student=spec,
                steps=args.throughput_steps,
                batch_size=8,
                warmup=1,
                lr=1e-4,
                name="s",
                threads=args.threads,
                checkpoint_every=0,
                progress=False,
            )
        )
        m = json.loads((sdir / "manifest.json").read_text())["metrics"]
        res[spec] = {
            "params": m["params"],
            "train_tokens_per_s": m["train_tokens_per_s"],
            "steps": m["steps"],
            "threads": args.threads,
        }
        print(spec, res[spec], flush=True)
        atomic_write_json(out / "throughput.json", res)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory with traces/")
    p.add_argument("--out", default="benchmarks/results/objectives")
    p.add_argument("--student", default="tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--limit", type=int, default=None, help="held-out questions per evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--throughput", nargs="*", default=None, help="student specs to time instead")
    p.add_argument("--throughput-steps", type=int, default=6)
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.throughput is not None:
        throughput(args)
    else:
        objectives(args)


if __name__ == "__main__":
    main()
