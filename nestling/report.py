"""The run report: what a run measured, side by side (report.json, report.md, report.png), and which artifact
to deploy.

    report = write_report(run_dir, collect_report(run_dir), tolerance=0.02)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nestling.serve.errors import NestlingError
from nestling.serve.manifest import try_read_json


def _read_json(path: Path) -> dict[str, Any]:
    return try_read_json(path) or {}


def _teacher_bytes(spec: str | None) -> int | None:
    if not spec or not spec.startswith("gguf:"):
        return None
    from nestling.distill.teachers import resolve_gguf

    try:
        return resolve_gguf(spec.removeprefix("gguf:")).stat().st_size
    except (NestlingError, OSError):
        return None


def collect_report(run_dir: Path) -> dict[str, Any]:
    """Gather the teacher, baseline, students (held-out eval) and exports (export-time checks) of a run."""
    from nestling.serve.manifest import try_read_manifest

    report: dict[str, Any] = {
        "run": str(run_dir),
        "teacher": {},
        "baseline": {},
        "students": {},
        "exports": {},
    }
    teacher = _read_json(run_dir / "teacher_eval.json").get("result") or {}
    if teacher:
        report["teacher"] = {
            "spec": teacher.get("spec"),
            "accuracy": teacher.get("accuracy"),
            "params": teacher.get("params"),
            "bytes": _teacher_bytes(teacher.get("spec")),
            "tokens_per_s": teacher.get("tokens_per_s"),
            "answer_s": {"explain": teacher.get("latency_s")},
            "n": (teacher.get("explain") or {}).get("n"),
        }
    for eval_path in sorted(run_dir.glob("students/*/eval.json")):
        name = eval_path.parent.name
        ev = _read_json(eval_path)
        res = ev.get("result") or {}
        report["baseline"] = {k: v for k, v in (ev.get("baseline") or {}).items() if k in ("accuracy", "n")}
        weights = sum(p.stat().st_size for p in (eval_path.parent / "model").glob("*.safetensors"))
        report["students"][name] = {
            "accuracy": res.get("accuracy"),
            "accuracy_answer_only": res.get("accuracy_answer"),
            "steps_all_right": (res.get("explain") or {}).get("steps_all_right"),
            "params": res.get("params"),
            "bytes": weights or None,
            "tokens_per_s": res.get("tokens_per_s"),
            "answer_s": {"explain": res.get("latency_s")},
            "n": (res.get("explain") or {}).get("n"),
        }
    for manifest_path in sorted(run_dir.glob("exports/*/manifest.json")):
        name = manifest_path.parent.name
        m = try_read_manifest(manifest_path.parent, "export") or {}
        timed = (_read_json(run_dir / "latency" / f"{name}.json").get("variants")) or {}
        params = (m.get("student") or {}).get("params")
        pytorch = (m.get("metrics") or {}).get("pytorch") or {}
        for variant, v in (m.get("variants") or {}).items():
            report["exports"][f"{name}-{variant}"] = {
                "student": name,
                "variant": variant,
                "engine": v.get("engine"),
                "path": str(manifest_path.parent / v["path"]),
                "accuracy": v.get("accuracy"),
                "accuracy_delta_vs_pytorch": v.get("accuracy_delta"),
                "pytorch_accuracy_same_prompts": pytorch.get("accuracy"),
                "n": (m.get("metrics") or {}).get("parity_prompts"),
                "params": params,
                "bytes": v.get("bytes"),
                "tokens_per_s": v.get("tokens_per_s"),
                "answer_s": {mode: t.get("median_s") for mode, t in (timed.get(variant) or {}).items()},
                "parity": v.get("parity"),
            }
    return report


def recommend(exports: dict[str, dict[str, Any]], tolerance: float) -> str | None:
    """The export with the quickest explained answer (median seconds per answer, what a user waits for) among
    those within `tolerance` of the most accurate export; decode tokens/s decides where answers were not
    timed."""
    scored = {k: v for k, v in exports.items() if v.get("accuracy") is not None and _speed(v) is not None}
    if not scored:
        return None
    best = max(v["accuracy"] for v in scored.values())
    near = {k: v for k, v in scored.items() if v["accuracy"] >= best - tolerance - 1e-9}
    return min(near, key=lambda k: _speed(near[k]))  # type: ignore[arg-type, return-value]


def _speed(e: dict[str, Any]) -> tuple[int, float] | None:
    """A sort key, lower is faster: timed answers first (seconds), then untimed ones by 1 / tokens/s."""
    seconds = (e.get("answer_s") or {}).get("explain")
    if seconds:
        return (0, seconds)
    return (1, 1.0 / e["tokens_per_s"]) if e.get("tokens_per_s") else None


def write_report(run_dir: Path, report: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """report.json (keys: teacher, baseline, students, exports, recommended), report.md and report.png."""
    from nestling.serve.manifest import atomic_write_json, atomic_write_text

    report = {
        **report,
        "tolerance": tolerance,
        "recommended": recommend(report.get("exports", {}), tolerance),
    }
    paths = {k: str(run_dir / f"report.{k}") for k in ("json", "md", "png")}
    report["paths"] = paths
    atomic_write_text(paths["md"], _report_markdown(report))
    _report_plot(report, Path(paths["png"]))
    atomic_write_json(paths["json"], report)
    return report


def _fmt(x: Any, kind: str) -> str:
    if x is None:
        return "-"
    if kind == "acc":
        return f"{100 * x:.1f}%"
    if kind == "params":
        return f"{x / 1e6:.2f}M"
    if kind == "bytes":
        return f"{x / 2**20:.1f} MiB"
    if kind == "s":
        return f"{1000 * x:,.0f} ms" if x < 1 else f"{x:.2f} s"
    return f"{x:,.0f}"


def _report_markdown(report: dict[str, Any]) -> str:
    rows = [("teacher", "", report.get("teacher", {}))]
    rows += [(f"student {k}", "", v) for k, v in report.get("students", {}).items()]
    rows += [(f"export {k}", v.get("student", ""), v) for k, v in report.get("exports", {}).items()]
    lines = [
        "# nestling run report",
        "",
        f"Trivial baseline (always the most common training answer): "
        f"{_fmt(report.get('baseline', {}).get('accuracy'), 'acc')}.",
        f"Recommended artifact: **{report.get('recommended') or '-'}** (the quickest explained answers among "
        f"exports within {100 * report['tolerance']:.0f} points of the most accurate one).",
        "",
        "| model | student | held-out accuracy | questions | params | size | decode tokens/s "
        "| per answer, explained | per answer, answer-only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, student, e in rows:
        answer_s = e.get("answer_s") or {}
        lines.append(
            f"| {name} | {student} | {_fmt(e.get('accuracy'), 'acc')} | {e.get('n') or '-'} | "
            f"{_fmt(e.get('params'), 'params')} | "
            f"{_fmt(e.get('bytes'), 'bytes')} | {_fmt(e.get('tokens_per_s'), 'tps')} | "
            f"{_fmt(answer_s.get('explain'), 's')} | {_fmt(answer_s.get('answer'), 's')} |"
        )
    lines += [
        "",
        "Teacher and students are scored on the held-out split (explain mode, greedy); each export on the "
        "first `questions` held-out prompts at export time, beside its PyTorch student on the same prompts "
        "(`accuracy_delta_vs_pytorch` in report.json). Decode speed is single-stream on this machine; "
        "per-answer times are medians over held-out questions asked one at a time through `Reasoner` (prompt "
        "included; the teacher's through its own engine and prompt).",
    ]
    return "\n".join(lines) + "\n"


def _report_plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs decode speed (log x): a colour per student, a marker per export variant, area ~ bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    students = list(report.get("students", {}))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(students)}
    markers = {"onnx-fp32": "s", "onnx-int8": "D", "gguf-f16": "^", "gguf-q8_0": "v", "gguf-q4_k_m": "P"}
    entries = [
        report.get("teacher", {}),
        *report.get("students", {}).values(),
        *report.get("exports", {}).values(),
    ]
    biggest = max([e.get("bytes") or 0 for e in entries] + [1])

    # Seconds per explained answer where the run timed them (what a user waits for), else decode tokens/s.
    timed = any((e.get("answer_s") or {}).get("explain") for e in report.get("exports", {}).values())

    def xval(e: dict[str, Any]) -> float | None:
        return (e.get("answer_s") or {}).get("explain") if timed else e.get("tokens_per_s")

    def plot(e: dict[str, Any], color: Any, marker: str, label: str | None = None) -> None:
        if e.get("accuracy") is None or not xval(e):
            return
        area = 30 + 400 * ((e.get("bytes") or 0) / biggest) ** 0.5
        x, y = xval(e), 100 * e["accuracy"]
        ax.scatter(x, y, s=area, color=color, marker=marker, alpha=0.75, edgecolors="black", linewidths=0.4)
        if label:
            ax.annotate(label, (x, y), fontsize=8, xytext=(6, 6), textcoords="offset points")

    plot(report.get("teacher", {}), "tab:red", "*", "teacher")
    for name, e in report.get("students", {}).items():
        plot(e, colors[name], "o", f"{name} (PyTorch)")
    for e in report.get("exports", {}).values():
        plot(e, colors.get(e.get("student"), "gray"), markers.get(e.get("variant"), "X"))
    rec = report.get("exports", {}).get(report.get("recommended") or "")
    if rec and xval(rec):
        ax.scatter(xval(rec), 100 * rec["accuracy"], s=700, facecolors="none", edgecolors="black")
        ax.annotate(
            "recommended",
            (xval(rec), 100 * rec["accuracy"]),
            fontsize=8,
            xytext=(0, -22),
            textcoords="offset points",
            ha="center",
        )
    base = report.get("baseline", {}).get("accuracy")
    if base is not None:
        ax.axhline(100 * base, ls="--", c="gray")
    handles = [Line2D([], [], ls="", marker=m, color="gray", label=v) for v, m in markers.items()]
    handles += [Line2D([], [], ls="", marker="o", color=c, label=f"student {n}") for n, c in colors.items()]
    if base is not None:
        handles.append(Line2D([], [], ls="--", color="gray", label=f"trivial baseline {100 * base:.1f}%"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.set_ylim(0, 105)  # from zero: small accuracy gaps should look small
    ax.set_xlabel(
        "seconds per explained answer, one at a time (log scale; left is faster)"
        if timed
        else "decode tokens/s, single stream (log scale)"
    )
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("nestling: accuracy / speed / size (marker area ~ bytes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
