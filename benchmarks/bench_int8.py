"""int8 ONNX recipes side by side on the bundled SmolLM2-135M: which keeps closest to fp32?

    OMP_NUM_THREADS=1 python3 benchmarks/bench_int8.py                  # bundled SmolLM2 (dequantized Q4_1)
    python3 benchmarks/bench_int8.py --student runs/x/students/smollm2/model --prompts 32

Recipes (export.onnx.quantize_onnx_int8): dynamic per-channel MatMul quantization (today's default), the same
with sensitive MatMuls kept fp32 (the output head, the MLP down projections), static QDQ quantization
calibrated on prefills of other questions with their greedy continuations (MinMax ranges, per-channel
weights), and weight-only int8 (MatMulNBits, blocks of 32) computed in fp32 or in int8 per block. Each is
compared with the PyTorch student by export.parity on --prompts held-out questions: greedy match,
teacher-forced top-1 agreement, max |dlogit|, decode tokens/s (1 thread), bytes. Writes families_int8.json
(+ .png) to --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nestling.core.manifest import atomic_write_json  # noqa: E402

RECIPES: dict[str, dict] = {
    "dynamic": {},
    "dynamic head-fp32": {"keep_fp32": ("lm_head",)},
    "dynamic head+down_proj-fp32": {"keep_fp32": ("lm_head", "down_proj")},
    "static-qdq": {"static": True},
    "static-qdq head-fp32": {"static": True, "keep_fp32": ("lm_head",)},
    "weight-only fp32-compute": {"weight_only": 0},
    "weight-only int8-compute": {"weight_only": 4},
}


def arithmetic(n: int, seed: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    return [
        (f"What is {a} + {b}?", str(a + b))
        for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))
    ]


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * rows[n]["greedy_match"] for n in names], 0.4, label="greedy match")
    ax.bar([i + 0.2 for i in x], [100 * rows[n]["teacher_forced_top1"] for n in names], 0.4, label="TF top-1")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("% agreement with PyTorch")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", type=Path, help="student dir (default: the bundled SmolLM2, saved fp32)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument(
        "--calibration", type=int, default=32, help="calibration questions (not the held-out ones)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import torch
    from nestling.distill.students import init_student, load_student, save_student
    from nestling.export.onnx import export_onnx_fp32, quantize_onnx_int8
    from nestling.export.parity import Prompt, check_variant, torch_reference
    from nestling.serve.engines import load_engine

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_int8-"))
    student = args.student
    if student is None:
        student = save_student(*init_student("gguf:smollm2"), work / "student")
    model, tok = load_student(student)
    prompts = [Prompt(q, g) for q, g in arithmetic(args.prompts, seed=1)]
    ref = torch_reference(model, tok, prompts, args.max_new_tokens)
    calib_prompts = [Prompt(q, g) for q, g in arithmetic(args.calibration, seed=2)]
    calib_ref = torch_reference(model, tok, calib_prompts, args.max_new_tokens)
    calibration = [p + o for p, o in zip(calib_ref.prompt_ids, calib_ref.outputs, strict=True)]
    del model

    t0 = time.perf_counter()
    fp32 = export_onnx_fp32(student, work / "fp32")
    rows: dict[str, dict] = {}
    candidates = {"fp32": (fp32, 0.0)}
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        recipe = RECIPES[name]
        t = time.perf_counter()
        path = quantize_onnx_int8(
            fp32,
            work / name.replace(" ", "_"),
            keep_fp32=recipe.get("keep_fp32", ()),
            calibration=calibration if recipe.get("static") else None,
            weight_only=recipe.get("weight_only"),
        )
        candidates[name] = (path, time.perf_counter() - t)
    for name, (path, seconds) in candidates.items():
        e = load_engine(path, kind="onnx")
        res = check_variant(name, e, ref, tok, prompts, max_new_tokens=args.max_new_tokens)
        e.close()
        rows[name] = {
            "greedy_match": res.greedy_match,
            "teacher_forced_top1": res.teacher_forced_top1,
            "max_abs_logit_diff": res.max_abs_logit_diff,
            "tokens_per_s": round(res.tokens_per_s, 1),
            "bytes": sum(p.stat().st_size for p in Path(path).glob("model.onnx*")),
            "quantize_seconds": round(seconds, 1),
        }
        print(
            f"{name:<32} greedy {100 * res.greedy_match:5.1f}%  tf-top1 {100 * res.teacher_forced_top1:5.1f}%"
            f"  max|dlogit| {res.max_abs_logit_diff:6.2f}  {res.tokens_per_s:6.1f} tok/s",
            flush=True,
        )
    report = {
        "question": "which int8 ONNX recipe keeps SmolLM2-135M closest to its PyTorch (fp32) outputs",
        "command": "OMP_NUM_THREADS=1 python3 benchmarks/bench_int8.py " + " ".join(argv or sys.argv[1:]),
        "student": str(args.student or "bundled SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)"),
        "prompts": args.prompts,
        "calibration_sequences": len(calibration),
        "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
        "recipes": {
            k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in RECIPES.get(k, {}).items()}
            for k in rows
        },
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "families_int8.json", report)
    plot(rows, args.out / "families_int8.png")
    return report


if __name__ == "__main__":
    main()
