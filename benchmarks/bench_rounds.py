"""Rounds (expert iteration): teacher greedy, teacher pass@k and each round's student on one held-out split.

    python benchmarks/bench_rounds.py --from-run runs/default --students tiny --rounds 3 --seeds 0
    python benchmarks/bench_rounds.py --from-run runs/x --students gguf:smollm2 --adopt smollm2 --rounds 2
    python benchmarks/bench_rounds.py --from-run runs/default --students gguf:smollm2 --rounds 2 \
        --round-fresh 400 --round-samples 2 --round-calculator [--round-rationalize]
    python benchmarks/bench_rounds.py --task rg:chain_sum?min_terms=3&max_terms=3 --n 400 --seeds 0 1 2

--from-run copies an existing run's traces and cached teacher eval (no teacher time; the run is only read);
otherwise the traces stage runs with the bundled teacher. Each seed trains its own students (the traces are
shared: the teacher's sampling is not what is measured). Teacher pass@k comes from the traces' records, which
sample training questions only: it is the share of training questions with a right sample (any_correct) and
with a verified rationale (coverage), not a held-out figure. Writes benchmarks/results/rounds.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from nestling.distill.accel import cpu_info

from nestling.core.manifest import read_json

HERE = Path(__file__).resolve().parent


def prepare(run: Path, args: argparse.Namespace) -> None:
    """The run's traces: copied from --from-run (with its teacher eval cache), else written by the teacher."""
    if args.from_run and not (run / "traces").is_dir():
        src = Path(args.from_run)
        shutil.copytree(src / "traces", run / "traces")
        if (src / "teacher_eval.json").is_file():
            shutil.copyfile(src / "teacher_eval.json", run / "teacher_eval.json")
        for name in args.adopt:  # round 1 taken over when its recipe matches (distill.rounds._adopt)
            shutil.copytree(src / "students" / name / "model", run / "students" / name / "model")
            shutil.copyfile(
                src / "students" / name / "manifest.json", run / "students" / name / "manifest.json"
            )
    if not args.from_run:
        from nestling.distill.traces import TracesConfig, run_traces

        run_traces(TracesConfig(out=str(run), task=args.task, n=args.n, adaptive=True, max_samples=6))


def one_seed(run: Path, seed: int, args: argparse.Namespace) -> dict:
    from nestling.distill.evaluate import EvalConfig, evaluate
    from nestling.distill.pipeline import DistillConfig, train_config
    from nestling.distill.rounds import run_rounds

    cfg = DistillConfig(
        out=str(run), students=args.students, rounds=args.rounds, round_samples=args.round_samples,
        round_fresh=args.round_fresh, round_dev=args.round_dev, round_calculator=args.round_calculator,
        round_rationalize=args.round_rationalize, seed=seed, steps=args.steps, eval_limit=args.eval_limit,
        threads=args.threads,
    )  # fmt: skip
    t0 = time.perf_counter()
    for spec in cfg.students:
        run_rounds(cfg, train_config(cfg, spec))
    seconds = time.perf_counter() - t0
    ev = evaluate(EvalConfig(run=str(run), students=cfg.student_names(), limit=args.eval_limit))
    out = {"seed": seed, "seconds": round(seconds, 1), "students": {}}
    for name in cfg.student_names():
        summary = read_json(run / "rounds" / name / "manifest.json")["metrics"]
        out["students"][name] = {
            "best_round": summary["best_round"],
            "stopped_by": summary["stopped_by"],
            "rounds": [
                {
                    "round": h["round"],
                    "student_rows": h["student_rows"],
                    "sampling": {k: v for k, v in (h.get("sampling") or {}).items() if k not in ("filters",)},
                    "dev": h["dev"],
                    "heldout": h["heldout"],
                }
                for h in summary["rounds"]
            ],
        }
    teacher = ev.get("teacher") or {}
    out["teacher_greedy"] = {"accuracy": teacher.get("accuracy"), "accuracy_ci": teacher.get("accuracy_ci")}
    out["baseline"] = ev["baseline"].get("accuracy")
    return out


def teacher_passk(run: Path) -> dict:
    card = read_json(run / "traces" / "datacard.json")
    return {
        "split": "train (the traces sample training questions only)",
        "k_max": card["sampling"]["max_samples_per_question"],
        "any_correct": card["questions_any_correct"],
        "coverage_verified": card["coverage"],
        "train_questions": card["questions"]["train"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for s in result["seeds"]:
        for name, st in s["students"].items():
            xs = [h["round"] for h in st["rounds"]]
            for mode, style in (("explain", "-o"), ("answer", "--s")):
                ys = [100 * h["heldout"][mode]["accuracy"] for h in st["rounds"]]
                lo = [
                    y - 100 * h["heldout"][mode]["accuracy_ci"][0]
                    for y, h in zip(ys, st["rounds"], strict=True)
                ]
                hi = [
                    100 * h["heldout"][mode]["accuracy_ci"][1] - y
                    for y, h in zip(ys, st["rounds"], strict=True)
                ]
                ax.errorbar(
                    xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=f"{name} {mode} (seed {s['seed']})"
                )
    greedy = result["seeds"][0]["teacher_greedy"]["accuracy"]
    if greedy is not None:
        ax.axhline(100 * greedy, color="tab:red", ls=":", label="teacher greedy (held-out)")
    ax.axhline(100 * result["teacher_passk"]["any_correct"], color="tab:red", ls="-.", alpha=0.5,
               label=f"teacher pass@{result['teacher_passk']['k_max']} (train questions)")  # fmt: skip
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%), bars: 95% interval")
    ax.set_ylim(0, 100)
    ax.set_xticks(
        sorted({h["round"] for s in result["seeds"] for st in s["students"].values() for h in st["rounds"]})
    )
    ax.set_title("nestling rounds: each round's student against the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-run", help="copy this run's traces and teacher eval (read only)")
    p.add_argument("--task", default=None, help="task spec when the teacher writes the traces")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--students", nargs="+", default=["tiny"])
    p.add_argument(
        "--adopt", nargs="*", default=[], help="--from-run students to copy as round 1 (same recipe)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-samples", type=int, default=4)
    p.add_argument("--round-fresh", type=int, default=100)
    p.add_argument("--round-dev", type=int, default=50)
    p.add_argument("--round-calculator", action="store_true", help="students sample with the calculator")
    p.add_argument(
        "--round-rationalize", action="store_true", help="STaR's hint (the gold) for questions left unsolved"
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--work", default="/tmp/bench_rounds", help="scratch run directories")
    p.add_argument("--out", default=str(HERE / "results" / "rounds.json"))
    args = p.parse_args()
    result: dict = {"config": vars(args), "machine": cpu_info(), "seeds": []}
    for seed in args.seeds:
        run = Path(args.work) / f"seed{seed}"
        prepare(run, args)
        result["teacher_passk"] = teacher_passk(run)
        result["seeds"].append(one_seed(run, seed, args))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
