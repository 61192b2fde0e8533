"""Recovery objectives side by side across compact sizes: merges bench_compress.py outputs (one per shape
and objective set, all on one run directory and at one --recover-minutes) into one JSON and a PNG of held-out
accuracy against the parameter ratio, one line per objective, the teacher's greedy accuracy as the bar.

    python3 benchmarks/plot_compress_objectives.py runs/obj45/*.json \
        --out benchmarks/results/objectives_run_budget

Each compact student's objective (off-policy, on-policy with its beta, mix with its lmbda) is read from its
compress manifest in the run directory, not guessed from its name. The run directory is read as each input
recorded it, so run this from where bench_compress.py ran (a relative --run is relative to there).

Seeds of one shape and objective (compress's seed, from the same manifest) are summarised together: the JSON's
"groups" hold their mean and spread, and the plot draws the mean with the seeds' spread as its bar and each
seed as a dot; a cell with one seed keeps its 95% Wilson interval as its bar.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from nestling.core.manifest import atomic_write_json, read_json


def compress_config(run: Path, name: str) -> dict | None:
    """The compress config of a recovered compact student; None for the source, its trimmed copy (no
    recovery), or a student compress did not make."""
    manifest = run / "students" / name / "manifest.json"
    if not manifest.is_file():
        return None
    m = read_json(manifest)
    if m.get("stage") != "compress" or "recovery" not in m.get("metrics", {}):
        return None
    return m["config"]


def objective_of(c: dict) -> str:
    """'off-policy', 'on-policy (beta B)' or 'mix (lmbda L, beta B)' from a compress config."""
    if c["objective"] == "on-policy":
        ends = {0.0: ", forward KL", 1.0: ", reverse KL"}  # generalized JSD's ends
        return f"on-policy (beta {c['beta']:g}{ends.get(float(c['beta']), '')})"
    if c["objective"] == "mix":
        return f"mix (lmbda {c['lmbda']:g}, beta {c['beta']:g})"
    return c["objective"]


def merge(paths: list[Path], skip: str | None = None) -> dict:
    """The compact students of every input, but those whose name matches `skip` (a regular expression): a
    cell re-run with a changed recipe under its own --tag replaces the old one in the merge."""
    rows: dict[str, dict] = {}
    teacher, machines = None, []
    for path in paths:
        res = json.loads(path.read_text())
        run = Path(res["run"])
        teacher = teacher or res["teacher"]
        if res.get("machine") and res["machine"] not in machines:
            machines.append(res["machine"])
        for name, row in res["students"].items():
            config = compress_config(run, name)
            if config is None or name in rows or (skip and re.search(skip, name)):
                continue
            recovery = row["compress"]["recovery"]
            rows[name] = {
                "objective": objective_of(config),
                "seed": config["seed"],
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
    return {
        "machines": machines,
        "teacher": teacher,
        "students": rows,
        "groups": groups(rows),
    }


def stat(xs: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(xs), 4),
        "stdev": round(statistics.stdev(xs), 4) if len(xs) > 1 else None,
    }


def groups(rows: dict[str, dict]) -> list[dict]:
    """One entry per objective and size: its seeds' accuracies (explain, answer), mean and spread."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows.values():
        cells.setdefault((r["objective"], r["param_ratio"]), []).append(r)
    out = []
    for (objective, ratio), rs in sorted(cells.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        rs = sorted(rs, key=lambda r: r["seed"])
        out.append(
            {
                "objective": objective,
                "param_ratio": ratio,
                "seeds": [r["seed"] for r in rs],
                "explain": stat([r["explain"]["accuracy"] for r in rs]),
                "explain_by_seed": [r["explain"]["accuracy"] for r in rs],
                "answer": stat([r["answer"]["accuracy"] for r in rs]),
                "answer_by_seed": [r["answer"]["accuracy"] for r in rs],
                "steps": [r["steps"] for r in rs],
                "speedup_answer": stat([r["speedup_vs_teacher"]["answer"] for r in rs]),
                "speedup_explain": stat([r["speedup_vs_teacher"]["explain"] for r in rs]),
            }
        )
    return out


def cell_bar(g: dict, mode: str, students: dict[str, dict]) -> tuple[float, float]:
    """Below and above the cell's point: the seeds' standard deviation, or one seed's 95% interval."""
    if g[mode]["stdev"] is not None:
        return 100 * g[mode]["stdev"], 100 * g[mode]["stdev"]
    (r,) = [
        r
        for r in students.values()
        if r["objective"] == g["objective"] and r["param_ratio"] == g["param_ratio"]
    ]
    lo, hi = r[mode]["ci95"]
    return 100 * (r[mode]["accuracy"] - lo), 100 * (hi - r[mode]["accuracy"])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    objectives = sorted({g["objective"] for g in res["groups"]})
    ratios = [g["param_ratio"] for g in res["groups"]]
    span = (max(ratios) - min(ratios)) or 0.1  # one size: a 0.1-wide axis around it
    for ax, mode in zip(axes, ("explain", "answer"), strict=True):
        ax.set_xlim(min(ratios) - 0.15 * span, max(ratios) + 0.15 * span)
        for i, obj in enumerate(objectives):
            dx = 0.015 * span * (i - (len(objectives) - 1) / 2)  # side by side where sizes coincide
            cells = sorted(
                (g for g in res["groups"] if g["objective"] == obj), key=lambda g: g["param_ratio"]
            )
            xs = [g["param_ratio"] + dx for g in cells]
            ys = [100 * g[mode]["mean"] for g in cells]
            bars = [cell_bar(g, mode, res["students"]) for g in cells]
            drawn = ax.errorbar(
                xs, ys, yerr=list(zip(*bars, strict=True)), fmt="-o", capsize=3, label=obj, alpha=0.8
            )
            for g, y in zip(cells, ys, strict=True):
                by_seed = g[f"{mode}_by_seed"]
                if len(by_seed) > 1:
                    color = drawn.lines[0].get_color()
                    ax.scatter(
                        [g["param_ratio"] + dx] * len(by_seed), [100 * a for a in by_seed], s=9, color=color
                    )
                label = "/".join(map(str, g["steps"]))
                ax.annotate(
                    label, (g["param_ratio"] + dx, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        t = 100 * res["teacher"]["heldout"]["accuracy"]
        ax.axhline(t, color="black", ls=":", label=f"teacher greedy, explain ({t:.1f}%)")
        ax.set_xlabel("parameters / teacher's")
        ax.set_title(f"{mode} mode (numbers: recovery steps fitted, per seed)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "compact students: recovery objectives at equal wall-clock "
        "(bars: the seeds' stdev, dots: each seed; one seed: its 95% interval)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="bench_compress.py JSON outputs")
    p.add_argument("--out", required=True)
    p.add_argument("--skip", help="leave out the students whose name matches this regular expression")
    args = p.parse_args()
    res = merge(args.inputs, args.skip)
    # appended, not with_suffix: a name such as run_t4.5_3seeds has a dot that is not a suffix
    out = args.out.removesuffix(".json").removesuffix(".png")
    atomic_write_json(Path(f"{out}.json"), res)
    plot(res, Path(f"{out}.png"))
    for name, r in sorted(
        res["students"].items(), key=lambda kv: (-kv[1]["param_ratio"], kv[1]["objective"])
    ):
        print(
            f"{name:36s} {r['param_ratio']:.3f}x {r['objective']:28s} steps {r['steps']:4d} "
            f"(on-policy {r['onpolicy_steps']}) {r['train_seconds']:6.0f}s  "
            f"explain {100 * r['explain']['accuracy']:.1f}%  answer {100 * r['answer']['accuracy']:.1f}%  "
            f"x{r['speedup_vs_teacher']['answer']} answer-only"
        )
    for g in res["groups"]:
        sd = lambda st: f" +- {100 * st['stdev']:.1f}" if st["stdev"] is not None else ""  # noqa: E731
        print(
            f"{g['param_ratio']:.3f}x {g['objective']:28s} seeds {g['seeds']}: explain "
            f"{100 * g['explain']['mean']:.1f}%{sd(g['explain'])}, answer {100 * g['answer']['mean']:.1f}%"
            f"{sd(g['answer'])}, steps {g['steps']}, answer-only x{g['speedup_answer']['mean']}"
        )


if __name__ == "__main__":
    main()
