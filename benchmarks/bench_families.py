"""Parity table, family x export variant: how closely each artifact follows its PyTorch student.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_families.py                  # tiny students + bundled SmolLM2
    python3 benchmarks/bench_families.py --families qwen2,phi3 --no-smollm2

For each family a tiny 2-layer student (tests/families.py: that family's config and kind of tokenizer) is
trained for --steps full fine-tuning steps on arithmetic rationales, then exported to every variant (ONNX
fp32/int8, GGUF f16/Q8_0/Q4_K_M) by `nestling export`, whose parity check measures, over --prompts held-out
questions: greedy match (whole continuation identical to PyTorch's) and teacher-forced top-1 agreement (on
PyTorch's own sequences). The bundled SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF, so the PyTorch
reference is that dequantized model) is the real-size row. Writes families.json and families.png to --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nestling.core.manifest import atomic_write_json  # noqa: E402

VARIANTS = ["onnx-fp32", "onnx-int8", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
METRICS = ("greedy_match", "teacher_forced_top1")


def questions(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """Held-out one-digit sums (the tiny students' training draws use another seed)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append((f"What is {a} + {b}?", str(a + b)))
    return out


def tiny_student(family: str, work: Path, steps: int) -> Path:
    from families import build_family, family_texts, train_steps
    from nestling.distill.students import save_student

    texts = family_texts()
    model, tok = build_family(family, texts)
    train_steps(model, tok, texts, steps=steps)
    return save_student(model, tok, work / family / "model")


def smollm2_student(work: Path) -> Path:
    from nestling.distill.students import init_student, save_student

    model, tok = init_student("gguf:smollm2")
    return save_student(model, tok, work / "smollm2" / "model")


def export_row(student: Path, out: Path, prompts: list[tuple[str, str]], max_new: int, threads: int) -> dict:
    from nestling.export.pipeline import ExportConfig, export_student

    t0 = time.perf_counter()
    cfg = ExportConfig(
        student=str(student),
        out=str(out),
        parity_prompts=len(prompts),
        max_new_tokens=max_new,
        threads=threads,
    )
    m = export_student(cfg, prompts=prompts)
    row = {
        name: {k: v["parity"][k] for k in (*METRICS, "max_abs_logit_diff", "tokenization_match")}
        | {"bytes": v["bytes"], "tokens_per_s": v["tokens_per_s"]}
        for name, v in m["variants"].items()
    }
    return {
        "family": m["student"]["family"],
        "params": m["student"]["params"],
        "variants": row,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(names) + 2))
    for ax, metric in zip(axes, METRICS, strict=True):
        grid = np.array([[100 * results[n]["variants"][v][metric] for v in VARIANTS] for n in names])
        ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(VARIANTS)), VARIANTS, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(VARIANTS)):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=9)
        ax.set_title(f"{metric.replace('_', ' ')} vs PyTorch (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    from families import FAMILY_NAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILY_NAMES), help="comma-separated model_types")
    ap.add_argument("--steps", type=int, default=150, help="full fine-tuning steps of each tiny student")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts per parity check")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--smollm2-prompts", type=int, default=8, help="fewer: PyTorch runs 134.5M parameters")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_families-"))
    results: dict[str, dict] = {}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        student = tiny_student(family, work, args.steps)
        results[family] = export_row(
            student, work / family / "export", questions(args.prompts), args.max_new_tokens, args.threads
        )
        print(family, {v: results[family]["variants"][v]["greedy_match"] for v in VARIANTS}, flush=True)
    if args.smollm2:
        student = smollm2_student(work)
        results["smollm2-135m"] = export_row(
            student,
            work / "smollm2" / "export",
            questions(args.smollm2_prompts),
            args.max_new_tokens,
            args.threads,
        )
    report = {
        "question": "greedy match and teacher-forced top-1 of every export variant vs its PyTorch student",
        "command": "OMP_NUM_THREADS=1 python3 benchmarks/bench_families.py " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args) | {"out": str(args.out)},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "families.json", report)
    plot(results, args.out / "families.png")
    for name, r in results.items():
        v = r["variants"]
        cells = "  ".join(
            f"{k} {100 * v[k]['greedy_match']:.0f}/{100 * v[k]['teacher_forced_top1']:.0f}" for k in VARIANTS
        )
        print(f"{name:<14} {cells}")
    return report


if __name__ == "__main__":
    main()
