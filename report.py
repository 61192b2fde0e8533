"""The run report: what a run measured, side by side (report.json, report.md, report.png), and which artifact
to deploy.

    report = write_report(run_dir, collect_report(run_dir), tolerance=0.02)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nestling.core.errors import NestlingError
from nestling.core.fmt import pct
from nestling.core.manifest import try_read_json
from nestling.core.rundir import RunDir


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
    """Gather the teacher, baseline, students (held-out eval) and exports (export-time checks) of a run.
    Every accuracy comes with its 95% Wilson interval (``accuracy_ci``) over its ``n`` questions."""
    report: dict[str, Any] = {"run": str(run_dir), "teacher": _teacher_entry(run_dir), "baseline": {}}
    report["students"] = {}
    for eval_path in sorted(run_dir.glob("students/*/eval.json")):
        ev = _read_json(eval_path)
        report["baseline"] = _with_ci({k: (ev.get("baseline") or {}).get(k) for k in ("accuracy", "n")})
        report["students"][eval_path.parent.name] = _student_entry(eval_path.parent, ev.get("result") or {})
    report["exports"] = {}
    for manifest_path in sorted(run_dir.glob("exports/*/manifest.json")):
        report["exports"].update(_export_entries(run_dir, manifest_path.parent))
    for e in report["exports"].values():
        _delta_vs_pytorch(e, report["students"].get(e["student"]) or {})
    report["rounds"] = collect_rounds(run_dir)
    report["teacher_passk"] = teacher_passk(run_dir)
    return report


def collect_rounds(run_dir: Path) -> dict[str, Any]:
    """Students trained in rounds (RUN/rounds/NAME/manifest.json, distill.rounds): per round its held-out
    accuracy explain and answer-only with 95% intervals, its dev accuracy, the student rows it trained on and
    what its sampling added; with the best round (the one in RUN/students/NAME) and why the rounds stopped."""
    from nestling.core.manifest import try_read_manifest

    out: dict[str, Any] = {}
    for path in sorted(run_dir.glob("rounds/*/manifest.json")):
        m = (try_read_manifest(path.parent, "rounds") or {}).get("metrics") or {}
        if not m.get("rounds"):
            continue
        out[path.parent.name] = {
            "best_round": m.get("best_round"),
            "stopped_by": m.get("stopped_by"),
            "dev_questions": m.get("dev_questions"),
            "rounds": [_round_entry(h) for h in m["rounds"]],
        }
    return out


def _round_entry(h: dict[str, Any]) -> dict[str, Any]:
    held, sampling = h.get("heldout") or {}, h.get("sampling") or {}
    return {
        "round": h["round"],
        "accuracy": (held.get("explain") or {}).get("accuracy"),
        "accuracy_ci": (held.get("explain") or {}).get("accuracy_ci"),
        "accuracy_answer_only": (held.get("answer") or {}).get("accuracy"),
        "accuracy_answer_only_ci": (held.get("answer") or {}).get("accuracy_ci"),
        "n": (held.get("explain") or {}).get("n"),
        "dev_accuracy": (h.get("dev") or {}).get("accuracy"),
        "student_rows": h.get("student_rows"),
        "rows_added": sampling.get("rows_kept"),
        "train_solved": sampling.get("train_solved"),
        "train_tried": sampling.get("train_tried"),
        "fresh_kept": sampling.get("fresh_kept"),
        "fresh_tried": sampling.get("fresh_tried"),
    }


def teacher_passk(run_dir: Path) -> dict[str, Any]:
    """The teacher's pass@k read off the traces' data card. The traces sample training questions only, so
    this is a training-split figure (share with a right sample; share with a verified rationale), beside a
    greedy accuracy measured on the held-out split."""
    card = _read_json(RunDir(run_dir).datacard)
    if not card:
        return {}
    return {
        "split": "train",
        "k": (card.get("sampling") or {}).get("max_samples_per_question"),
        "questions": (card.get("questions") or {}).get("train"),
        "any_correct": card.get("questions_any_correct"),
        "verified": card.get("coverage"),
    }


def rounds_markdown(report: dict[str, Any]) -> list[str]:
    """The report's rounds section: one table per student trained in rounds, teacher figures above it."""
    rounds = report.get("rounds") or {}
    if not rounds:
        return []
    t, pk = report.get("teacher") or {}, report.get("teacher_passk") or {}
    lines = [
        "",
        "## Rounds",
        "",
        f"Teacher greedy on the held-out split: {_fmt(t.get('accuracy'), 'acc')} "
        f"{_fmt(t.get('accuracy_ci'), 'ci')}. Teacher pass@{pk.get('k') or '?'} on the "
        f"{pk.get('questions') or '?'} "
        f"training questions (the traces sample no held-out question): {_fmt(pk.get('any_correct'), 'acc')} "
        f"with a right answer, {_fmt(pk.get('verified'), 'acc')} with a verified rationale.",
    ]
    for name, st in rounds.items():
        lines += [
            "",
            f"Student {name}: best round {st['best_round']} on {st.get('dev_questions') or 0} dev questions "
            f"(stopped by: {st['stopped_by']}); RUN/students/{name} holds it.",
            "",
            "| round | held-out (explain) | 95% interval | answer-only | 95% interval | dev | student rows "
            "| added: train solved / tried | fresh kept / tried |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in st["rounds"]:
            added = f"{e['train_solved']} / {e['train_tried']}" if e.get("train_tried") is not None else "-"
            fresh = f"{e['fresh_kept']} / {e['fresh_tried']}" if e.get("fresh_tried") is not None else "-"
            lines.append(
                f"| {e['round']}{' (best)' if e['round'] == st['best_round'] else ''} | "
                f"{_fmt(e['accuracy'], 'acc')} | {_fmt(e['accuracy_ci'], 'ci')} | "
                f"{_fmt(e['accuracy_answer_only'], 'acc')} | {_fmt(e['accuracy_answer_only_ci'], 'ci')} | "
                f"{_fmt(e['dev_accuracy'], 'acc')} | {e['student_rows'] or 0} | {added} | {fresh} |"
            )
    return lines


def _plot_rounds(ax: Any, report: dict[str, Any]) -> None:
    """Each round's student on the held-out split (explain solid, answer-only dashed, 95% bars) against the
    teacher's greedy accuracy and its pass@k (on training questions, dotted)."""
    for i, (name, st) in enumerate((report.get("rounds") or {}).items()):
        color = f"C{i % 10}"
        for key, style in (("accuracy", "-o"), ("accuracy_answer_only", "--s")):
            pts = [e for e in st["rounds"] if e.get(key) is not None]
            xs, ys = [e["round"] for e in pts], [100 * e[key] for e in pts]
            err = [[y - 100 * e[f"{key}_ci"][0] for y, e in zip(ys, pts, strict=True)],
                   [100 * e[f"{key}_ci"][1] - y for y, e in zip(ys, pts, strict=True)]]  # fmt: skip
            mode = "explain" if key == "accuracy" else "answer-only"
            ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, capsize=3, label=f"{name} {mode}")
    t, pk = report.get("teacher") or {}, report.get("teacher_passk") or {}
    if t.get("accuracy") is not None:
        ax.axhline(100 * t["accuracy"], color="tab:red", ls="--", label="teacher greedy")
    if pk.get("any_correct") is not None:
        ax.axhline(
            100 * pk["any_correct"], color="tab:red", ls=":", label=f"teacher pass@{pk.get('k')} (train)"
        )
    ax.set_xlabel("round (each retrained from the base on teacher + verified student rows)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)


def _delta_vs_pytorch(export: dict[str, Any], student: dict[str, Any]) -> None:
    """Export minus PyTorch accuracy on the same held-out questions: the run's timed pass answers the first
    n of the split its student was evaluated on, and the student's per-question record gives its accuracy on
    those n (without the record, only when both scored the whole split). The export-time parity delta
    covers only a few prompts."""
    n, correct = export.get("n"), student.get("correct") or ""
    if not n or export.get("accuracy") is None or student.get("accuracy") is None:
        return
    if len(correct) >= n:
        reference = correct[:n].count("1") / n
    elif n == student.get("n"):
        reference = student["accuracy"]
    else:
        return
    export["accuracy_delta_vs_pytorch"] = round(export["accuracy"] - reference, 4)
    export["pytorch_accuracy_same_questions"] = round(reference, 4)


def _with_ci(entry: dict[str, Any]) -> dict[str, Any]:
    from nestling.distill.stats import wilson

    acc, n = entry.get("accuracy"), entry.get("n")
    if acc is not None and n and not entry.get("accuracy_ci"):
        entry["accuracy_ci"] = wilson(round(acc * n), n)
    return entry


def _teacher_entry(run_dir: Path) -> dict[str, Any]:
    teacher = _read_json(RunDir(run_dir).teacher_eval).get("result") or {}
    if not teacher:
        return {}
    explain = teacher.get("explain") or {}
    return _with_ci(
        {
            "spec": teacher.get("spec"),
            "accuracy": teacher.get("accuracy"),
            "accuracy_ci": explain.get("accuracy_ci"),
            "params": teacher.get("params"),
            "bytes": _teacher_bytes(teacher.get("spec")),
            "tokens_per_s": teacher.get("tokens_per_s"),
            "answer_s": {"explain": teacher.get("latency_s")},
            "n": explain.get("n"),
            "correct": explain.get("correct"),
        }
    )


def _student_entry(student_dir: Path, res: dict[str, Any]) -> dict[str, Any]:
    explain = res.get("explain") or {}
    weights = sum(p.stat().st_size for p in (student_dir / "model").glob("*.safetensors"))
    return _with_ci(
        {
            "accuracy": res.get("accuracy"),
            "accuracy_ci": explain.get("accuracy_ci"),
            "accuracy_answer_only": res.get("accuracy_answer"),
            "steps_all_right": explain.get("steps_all_right"),
            "explanations_complete": explain.get("complete"),
            "params": res.get("params"),
            "bytes": weights or None,
            "tokens_per_s": res.get("tokens_per_s"),
            "answer_s": {"explain": res.get("latency_s")},
            "n": explain.get("n"),
        }
    )


def _export_entries(run_dir: Path, export_dir: Path) -> dict[str, dict[str, Any]]:
    """One entry per variant of an export: accuracy and answer times from the run's pass over the held-out
    questions through Reasoner (RUN/latency), else the export-time check on its parity prompts."""
    from nestling.core.manifest import try_read_manifest

    name = export_dir.name
    m = try_read_manifest(export_dir, "export") or {}
    timed = _read_json(RunDir(run_dir).latency(name)).get("variants") or {}
    calc = _read_json(RunDir(run_dir).calculator(name)).get("calculator") or {}
    metrics = m.get("metrics") or {}
    entries = {}
    for variant, v in (m.get("variants") or {}).items():
        t = timed.get(variant) or {}
        scored = (t.get("explain") or {}).get("accuracy") is not None
        entries[f"{name}-{variant}"] = _with_ci(
            {
                "student": name,
                "variant": variant,
                "default": variant == m.get("default_variant"),
                "engine": v.get("engine"),
                "path": str(export_dir / v["path"]),
                "accuracy": t["explain"]["accuracy"] if scored else v.get("accuracy"),
                "accuracy_answer_only": (t.get("answer") or {}).get("accuracy"),
                "n": t["explain"]["n"] if scored else metrics.get("parity_prompts"),
                "parity_accuracy": v.get("accuracy"),
                "parity_accuracy_delta_vs_pytorch": v.get("accuracy_delta"),
                "parity_prompts": metrics.get("parity_prompts"),
                "params": (m.get("student") or {}).get("params"),
                "bytes": v.get("bytes"),
                "tokens_per_s": v.get("tokens_per_s"),
                "answer_s": {mode: x.get("median_s") for mode, x in t.items()},
                "parity": v.get("parity"),
            }
        )
        if calc.get("variant") == variant and calc.get("accuracy") is not None:
            entries[f"{name}-{variant}"]["calculator"] = _calculator_entry(calc)
    return entries


def _calculator_entry(calc: dict[str, Any]) -> dict[str, Any]:
    """The default variant explaining with the calculator in the loop (latency.measure_calculator)."""
    from nestling.distill.stats import wilson

    return {
        "accuracy": calc["accuracy"], "accuracy_ci": wilson(calc["correct"], calc["n"]), "n": calc["n"],
        "complete_share": calc.get("complete_share"), "answer_s": calc.get("median_s"),
        "corrections_per_answer": calc.get("corrections_per_answer"),
    }  # fmt: skip


def recommend(exports: dict[str, dict[str, Any]], tolerance: float) -> str | None:
    """The export the report recommends: export.pipeline.fastest_within, the rule that chose each export's
    default variant, over the exports' default variants (recorded as "default": what `nestling serve` of
    that directory loads), with accuracy measured against the most accurate of them."""
    from nestling.export.pipeline import fastest_within

    pool = {k: v for k, v in exports.items() if v.get("default", True) and v.get("accuracy") is not None}
    if not pool:
        return None
    best = max(v["accuracy"] for v in pool.values())
    return fastest_within(
        {k: {**v, "accuracy_delta": v["accuracy"] - best} for k, v in pool.items()}, tolerance
    )


def write_report(run_dir: Path, report: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """report.json (keys: teacher, baseline, students, exports, recommended), report.md and report.png."""
    from nestling.core.manifest import atomic_write_json, atomic_write_text

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
        return pct(x)
    if kind == "ci":
        return f"[{100 * x[0]:.0f}, {100 * x[1]:.0f}]"
    if kind == "params":
        return f"{x / 1e6:.2f}M"
    if kind == "bytes":
        return f"{x / 2**20:.1f} MiB"
    if kind == "s":
        return f"{1000 * x:,.0f} ms" if x < 1 else f"{x:.2f} s"
    return f"{x:,.0f}"


def _questions(entry: dict[str, Any]) -> str:
    """How many questions an accuracy is over, with the PyTorch student's accuracy on those same ones where
    an export answered only some of the split."""
    same = entry.get("pytorch_accuracy_same_questions")
    n = entry.get("n") or "-"
    return f"{n} (PyTorch {pct(same)})" if same is not None else str(n)


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
        "| model | student | held-out accuracy | 95% interval | answer-only accuracy | questions | params "
        "| size | decode tokens/s | per answer, explained | per answer, answer-only |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, student, e in rows:
        answer_s = e.get("answer_s") or {}
        lines.append(
            f"| {name} | {student} | {_fmt(e.get('accuracy'), 'acc')} | {_fmt(e.get('accuracy_ci'), 'ci')} | "
            f"{_fmt(e.get('accuracy_answer_only'), 'acc')} | {_questions(e)} | "
            f"{_fmt(e.get('params'), 'params')} | "
            f"{_fmt(e.get('bytes'), 'bytes')} | {_fmt(e.get('tokens_per_s'), 'tps')} | "
            f"{_fmt(answer_s.get('explain'), 's')} | {_fmt(answer_s.get('answer'), 's')} |"
        )
    lines += [
        "",
        "Teacher and students are scored on the held-out split (explain mode, greedy); each export on the "
        "first held-out questions, answered one at a time through `Reasoner` (`--latency-questions`; its "
        "PyTorch student's accuracy on those same questions is `pytorch_accuracy_same_questions` in "
        "report.json, the difference `accuracy_delta_vs_pytorch`, beside the export-time parity check). "
        "Decode speed is single-stream on this machine; per-answer times are "
        "medians over those answers (prompt included; the teacher's through its own engine and prompt).",
    ]
    lines += _calculator_markdown(report)
    lines += rounds_markdown(report)
    return "\n".join(lines) + "\n"


def _calculator_markdown(report: dict[str, Any]) -> list[str]:
    calc = {k: e for k, e in report.get("exports", {}).items() if e.get("calculator")}
    if not calc:
        return []
    lines = [
        "",
        "## With the calculator in the loop",
        "",
        "Each export's default variant, explaining, with `calculator=True` (`nestling ask --calculator`): a "
        "false result is replaced by the true one as it is written and the model goes on from it; the same "
        "held-out questions.",
        "",
        "| export | accuracy | 95% interval | without the calculator | complete explanations "
        "| corrections per answer | per answer, explained |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in calc.items():
        c = e["calculator"]
        lines.append(
            f"| {name} | {_fmt(c['accuracy'], 'acc')} | {_fmt(c['accuracy_ci'], 'ci')} | "
            f"{_fmt(e.get('accuracy'), 'acc')} | {_fmt(c.get('complete_share'), 'acc')} | "
            f"{c.get('corrections_per_answer') or 0:.2f} | {_fmt(c.get('answer_s'), 's')} |"
        )
    return lines


MARKERS = {"onnx-fp32": "s", "onnx-int8": "D", "gguf-f16": "^", "gguf-q8_0": "v", "gguf-q4_k_m": "P"}


def _report_plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy (with its 95% interval) vs seconds per explained answer where the run timed answers, else vs
    decode tokens/s (log x): a colour per student, a marker per export variant, marker area ~ bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.get("rounds"):
        fig, (ax, rounds_ax) = plt.subplots(2, 1, figsize=(9, 10), dpi=120)
        _plot_rounds(rounds_ax, report)
    else:
        fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(report.get("students", {}))}
    timed = any((e.get("answer_s") or {}).get("explain") for e in report.get("exports", {}).values())
    x_of = (
        (lambda e: (e.get("answer_s") or {}).get("explain")) if timed else (lambda e: e.get("tokens_per_s"))
    )
    _plot_points(ax, report, x_of, colors)
    _ring_recommended(ax, report, x_of)
    _legend(ax, report, colors)
    ax.set_xscale("log")
    ax.set_ylim(0, 105)  # from zero: small accuracy gaps should look small
    ax.set_xlabel(
        "seconds per explained answer, one at a time (log scale; left is faster)"
        if timed
        else "decode tokens/s, single stream (log scale)"
    )
    ax.set_ylabel("held-out accuracy (%), bars: 95% interval")
    ax.set_title("nestling: accuracy / speed / size (marker area ~ bytes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_points(ax: Any, report: dict[str, Any], x_of: Any, colors: dict[str, Any]) -> None:
    students, exports = report.get("students", {}), report.get("exports", {})
    points = [(report.get("teacher", {}), "tab:red", "*", "teacher")]
    points += [(e, colors[name], "o", f"{name} (PyTorch)") for name, e in students.items()]
    points += [
        (e, colors.get(e.get("student"), "gray"), MARKERS.get(e.get("variant"), "X"), None)
        for e in exports.values()
    ]
    biggest = max([e.get("bytes") or 0 for e, *_ in points] + [1])
    for e, color, marker, label in points:
        x = x_of(e)
        if e.get("accuracy") is None or not x:
            continue
        y = 100 * e["accuracy"]
        area = 30 + 400 * ((e.get("bytes") or 0) / biggest) ** 0.5
        if e.get("accuracy_ci"):
            low, high = (100 * c for c in e["accuracy_ci"])
            ax.errorbar(x, y, yerr=[[y - low], [high - y]], color=color, alpha=0.4, lw=1, capsize=2)
        ax.scatter(x, y, s=area, color=color, marker=marker, alpha=0.75, edgecolors="black", linewidths=0.4)
        if label:
            ax.annotate(label, (x, y), fontsize=8, xytext=(6, 6), textcoords="offset points")


def _ring_recommended(ax: Any, report: dict[str, Any], x_of: Any) -> None:
    rec = report.get("exports", {}).get(report.get("recommended") or "")
    if not rec or not x_of(rec):
        return
    xy = (x_of(rec), 100 * rec["accuracy"])
    ax.scatter(*xy, s=700, facecolors="none", edgecolors="black")
    ax.annotate("recommended", xy, fontsize=8, xytext=(0, -22), textcoords="offset points", ha="center")


def _legend(ax: Any, report: dict[str, Any], colors: dict[str, Any]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker=m, color="gray", label=v) for v, m in MARKERS.items()]
    handles += [Line2D([], [], ls="", marker="o", color=c, label=f"student {n}") for n, c in colors.items()]
    base = report.get("baseline", {}).get("accuracy")
    if base is not None:
        ax.axhline(100 * base, ls="--", c="gray")
        handles.append(Line2D([], [], ls="--", color="gray", label=f"trivial baseline {100 * base:.1f}%"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
