"""Recovery objectives side by side across compact sizes: merges bench_compress.py outputs (one per shape
and objective set, all on one run directory and at one --recover-minutes) into one JSON and a PNG of held-out
accuracy against the parameter ratio, one line per objective, the teacher's greedy accuracy as the bar.

    python3 benchmarks/plot_compress_objectives.py runs/obj45/*.json \
        --out benchmarks/results/objectives_run_budget

Each compact student's objective (off-policy, on-policy with its beta, mix with its lmbda) is read from its
compress manifest in the run directory, not guessed from its name. The run directory is read as each input
recorded it, so run this from where bench_compress.py ran (a relative --run is relative to there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nestling.core.manifest import atomic_write_json, read_json


def objective_of(run: Path, name: str) -> str | None:
    """'off-policy', 'on-policy (beta B)' or 'mix (lmbda L, beta B)'; None where compress did not make it."""
    manifest = run / "students" / name / "manifest.json"
    if not manifest.is_file():
        return None
    m = read_json(manifest)
    if m.get("stage") != "compress" or "recovery" not in m.get("metrics", {}):
        return None  # the source, or its trimmed copy (no recovery)
    c = m["config"]
    if c["objective"] == "on-policy":
        ends = {0.0: ", forward KL", 1.0: ", reverse KL"}  # generalized JSD's ends
        return f"on-policy (beta {c['beta']:g}{ends.get(float(c['beta']), '')})"
    if c["objective"] == "mix":
        return f"mix (lmbda {c['lmbda']:g}, beta {c['beta']:g})"
    return c["objective"]


def merge(paths: list[Path]) -> dict:
    rows: dict[str, dict] = {}
    teacher = None
    for path in paths:
        res = json.loads(path.read_text())
        run = Path(res["run"])
        teacher = teacher or res["teacher"]
        for name, row in res["students"].items():
            objective = objective_of(run, name)
            if objective is None or name in rows:
                continue
            recovery = row["compress"]["recovery"]
            rows[name] = {
                "objective": objective,
                "params": row["params"],
                "param_ratio": row["param_ratio"],
                "explain": row["pytorch"]["explain"],
                "answer": row["pytorch"]["answer"],
                "q8_0_explain": row["gguf_q8_0"]["explain"],
                "speedup_vs_teacher": row["speedup_vs_teacher"],
                "steps": recovery["steps"],
                "onpolicy_steps": recovery["onpolicy_steps"],
                "train_seconds": recovery["train_seconds"],
                "precision": recovery["precision"],
                "source": str(path),
            }
    return {"teacher": teacher, "students": rows}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    objectives = sorted({r["objective"] for r in res["students"].values()})
    for ax, mode in zip(axes, ("explain", "answer"), strict=True):
        for obj in objectives:
            pts = sorted(
                (r["param_ratio"], r[mode], r["steps"])
                for r in res["students"].values()
                if r["objective"] == obj
            )
            xs = [x for x, _, _ in pts]
            ys = [100 * a["accuracy"] for _, a, _ in pts]
            lo = [y - 100 * a["ci95"][0] for y, (_, a, _) in zip(ys, pts, strict=True)]
            hi = [100 * a["ci95"][1] - y for y, (_, a, _) in zip(ys, pts, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="-o", capsize=3, label=obj, alpha=0.8)
            for x, y, (_, _, steps) in zip(xs, ys, pts, strict=True):
                ax.annotate(f"{steps}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        t = 100 * res["teacher"]["heldout"]["accuracy"]
        ax.axhline(t, color="black", ls=":", label=f"teacher greedy, explain ({t:.1f}%)")
        ax.set_xlabel("parameters / teacher's")
        ax.set_title(f"{mode} mode (numbers: recovery steps fitted)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%), bars: 95% interval")
    axes[0].legend(fontsize=7)
    fig.suptitle("compact students: recovery objectives at equal wall-clock")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="bench_compress.py JSON outputs")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    res = merge(args.inputs)
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), res)
    plot(res, out.with_suffix(".png"))
    for name, r in sorted(
        res["students"].items(), key=lambda kv: (-kv[1]["param_ratio"], kv[1]["objective"])
    ):
        print(
            f"{name:36s} {r['param_ratio']:.3f}x {r['objective']:28s} steps {r['steps']:4d} "
            f"(on-policy {r['onpolicy_steps']}) {r['train_seconds']:6.0f}s  "
            f"explain {100 * r['explain']['accuracy']:.1f}%  answer {100 * r['answer']['accuracy']:.1f}%  "
            f"x{r['speedup_vs_teacher']['answer']} answer-only"
        )


if __name__ == "__main__":
    main()
