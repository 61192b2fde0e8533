"""The accuracy / size / speed frontier of every student trained in a run directory, beside the teacher.

    python3 benchmarks/bench_students.py --run runs/x --out benchmarks/results/students

Reads RUN/teacher_eval.json, RUN/students/*/eval.json and each student's train manifest (params, training
tokens/s, recipe); writes OUT.json and OUT.png (held-out accuracy against batch-1 decode tokens/s, marker
area ~ parameters). Train students first (`nestling distill` or `nestling train` + `nestling eval`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nestling.core.manifest import atomic_write_json  # noqa: E402


def collect(run: Path) -> dict:
    def read(p: Path) -> dict:
        return json.loads(p.read_text()) if p.is_file() else {}

    teacher = read(run / "teacher_eval.json").get("result") or {}
    rows = {}
    for ev_path in sorted(run.glob("students/*/eval.json")):
        ev, m = read(ev_path), read(ev_path.parent / "manifest.json")
        r = ev.get("result") or {}
        rows[ev_path.parent.name] = {
            "spec": (m.get("config") or {}).get("student"),
            "recipe": {
                k: (m.get("config") or {}).get(k) for k in ("objective", "steps", "lr", "train_layers")
            },
            "params": r.get("params"),
            "explain_acc": r.get("accuracy"),
            "answer_acc": r.get("accuracy_answer"),
            "steps_all_right": (r.get("explain") or {}).get("steps_all_right"),
            "consistent": (r.get("explain") or {}).get("consistent"),
            "latency_s": r.get("latency_s"),
            "decode_tokens_per_s": r.get("tokens_per_s"),
            "train_tokens_per_s": (m.get("metrics") or {}).get("train_tokens_per_s"),
            "train_seconds": (m.get("metrics") or {}).get("train_seconds"),
            "baseline": (ev.get("baseline") or {}).get("accuracy"),
        }
    return {
        "run": str(run),
        "teacher": {k: teacher.get(k) for k in ("spec", "params", "accuracy", "latency_s", "tokens_per_s")},
        "students": rows,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = [
        (
            "teacher",
            res["teacher"].get("tokens_per_s"),
            res["teacher"].get("accuracy"),
            res["teacher"].get("params"),
            "tab:red",
        )
    ]
    points += [
        (k, v["decode_tokens_per_s"], v["explain_acc"], v["params"], "tab:blue")
        for k, v in res["students"].items()
    ]
    for label, tps, acc, params, color in points:
        if tps and acc is not None:
            ax.scatter(tps, 100 * acc, s=30 + 300 * ((params or 0) / 135e6) ** 0.5, c=color, alpha=0.7)
            ax.annotate(
                f"{label} ({(params or 0) / 1e6:.1f}M)",
                (tps, 100 * acc),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    base = next((v["baseline"] for v in res["students"].values() if v.get("baseline") is not None), None)
    if base is not None:
        ax.axhline(100 * base, ls="--", c="gray", label="trivial baseline")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("decode tokens/s, batch 1, PyTorch eager (teacher: llama.cpp)")
    ax.set_ylabel("held-out accuracy, explain mode (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--out", default="benchmarks/results/students")
    args = p.parse_args()
    res = collect(Path(args.run))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), res)
    plot(res, out.with_suffix(".png"))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
