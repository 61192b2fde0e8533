"""Decode speed of the PyTorch student vs every export and the bundled teacher, in one run.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_export.py                      # builds a "tiny" preset student
    python3 benchmarks/bench_export.py --export runs/x/exports/tiny --student runs/x/students/tiny/model

Greedy decode tokens/s after a fixed prompt (eos ignored so every engine decodes the same count), median of
--repeats, same thread count for everything. Writes bench_export.json and bench_export.png to --out, with
each speed as a ratio to the teacher's. Target: the fastest export >= 20x the teacher.
Timings are of this machine at that moment: other processes running at the same time slow them down.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nestling.export.parity import decode_speed, torch_decode_speed  # noqa: E402

from nestling.core.manifest import atomic_write_json  # noqa: E402

PROMPT = "Question: What is 7 + 8? Think about the digits and carry carefully.\nExplain:"


def _torch_speed(student_dir: Path, n: int, repeats: int, threads: int) -> tuple[float, list[int]]:
    import torch
    from nestling.distill.students import load_student

    torch.set_num_threads(threads)
    model, tok = load_student(student_dir)
    ids = tok(PROMPT)["input_ids"]
    return torch_decode_speed(model, ids, n, repeats), ids


def build_default_student(work: Path) -> Path:
    """The "tiny" preset (4 layers, hidden 256) with a tokenizer on synthetic arithmetic; untrained weights
    decode at the same speed as trained ones."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import arithmetic_rows, training_texts
    from nestling.distill.students import new_student, save_student, train_tokenizer

    tok = train_tokenizer(training_texts(arithmetic_rows(400)), vocab_size=2048)
    return save_student(new_student("tiny", tok), tok, work / "student")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", type=Path, help="student dir (default: build the tiny preset)")
    ap.add_argument("--export", type=Path, help="export dir (default: export the student now)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    from nestling.distill.students import bundled_smollm2
    from nestling.export.pipeline import ExportConfig, export_student
    from nestling.serve.engines import load_engine

    from nestling.core.manifest import read_manifest

    work = Path(tempfile.mkdtemp(prefix="bench_export-"))
    student = args.student or build_default_student(work)
    export_dir = args.export
    if export_dir is None:
        export_dir = work / "export"
        export_student(ExportConfig(student=str(student), out=str(export_dir), threads=args.threads))
    manifest = read_manifest(export_dir, "export")

    torch_rate, ids = _torch_speed(student, args.tokens, args.repeats, args.threads)
    rows: dict[str, dict] = {
        "pytorch": {"tokens_per_s": torch_rate, "bytes": manifest["metrics"]["pytorch"]["bytes"]}
    }
    for name, v in manifest["variants"].items():
        e = load_engine(export_dir / v["path"], kind=v["engine"], n_threads=args.threads)
        assert e.tokenize(PROMPT) == ids, f"{name}: tokenization differs from PyTorch's"
        rows[name] = {"tokens_per_s": decode_speed(e, ids, args.tokens, args.repeats), "bytes": v["bytes"]}
        e.close()
    teacher_path = bundled_smollm2()
    t = load_engine(teacher_path, kind="gguf", n_threads=args.threads)
    t_ids = t.tokenize(PROMPT)
    teacher_rate = decode_speed(t, t_ids, args.teacher_tokens, args.repeats)
    t.close()
    rows["teacher (SmolLM2-135M Q4_1)"] = {"tokens_per_s": teacher_rate, "bytes": teacher_path.stat().st_size}
    for r in rows.values():
        r["x_teacher"] = r["tokens_per_s"] / teacher_rate
        r["tokens_per_s"] = round(r["tokens_per_s"], 1)
        r["x_teacher"] = round(r["x_teacher"], 2)
    exports = {k: v for k, v in rows.items() if k in manifest["variants"]}
    fastest = max(exports, key=lambda k: exports[k]["tokens_per_s"])
    result = {
        "threads": args.threads,
        "decode_tokens": args.tokens,
        "teacher_decode_tokens": args.teacher_tokens,
        "repeats": args.repeats,
        "student_params": manifest["student"]["params"],
        "rows": rows,
        "fastest_export": fastest,
        "fastest_x_teacher": rows[fastest]["x_teacher"],
        "target_20x_met": rows[fastest]["x_teacher"] >= 20,
        "note": "median decode tokens/s after a fixed prompt; other processes may have shared the CPU",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench_export.json", result)
    _plot(rows, args.out / "bench_export.png", args.threads)
    for k, r in rows.items():
        print(f"{k:<30}{r['tokens_per_s']:>10,.0f} tok/s {r['x_teacher']:>8.1f}x teacher {r['bytes']:>14,} B")
    print(f"fastest export {fastest}: {rows[fastest]['x_teacher']:.1f}x the teacher (target >= 20x)")
    return result


def _plot(rows: dict[str, dict], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    speeds = [rows[n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(
        names, speeds, color=["#888" if n.startswith(("pytorch", "teacher")) else "#2a7" for n in names]
    )
    for b, n in zip(bars, names, strict=True):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {rows[n]['x_teacher']:.1f}x", va="center")
    ax.set_xlabel(f"decode tokens/s ({threads} thread{'s' if threads > 1 else ''}; ratio to the teacher)")
    ax.invert_yaxis()
    ax.set_title("nestling export: decode speed per artifact")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
