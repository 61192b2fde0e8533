"""The Markdown tables of eval: what the accuracies are scored against, then every model side by side.

    summary_table({"teacher": t, "baseline": b, "students": {"tiny": s}, "reference": ref})
    student_md("tiny", s, b, t, ref)     # RUN/students/tiny/eval.md

Rates print as a percentage with their 95% interval (core.fmt.pct).
"""

from __future__ import annotations

from typing import Any

from nestling.distill.stats import wilson

from nestling.core.fmt import pct


def reference_line(ref: dict[str, Any]) -> str:
    """The sentence every table carries: what the accuracies were scored against."""
    if ref.get("kind") != "teacher-vote":
        return (
            f"Scored against gold answers ({ref.get('heldout', '?')} held-out questions); "
            "brackets: 95% Wilson interval."
        )
    return (
        f"**No gold answers: scored against the teacher's self-consistency vote** ({ref['teacher']}, "
        f"{ref['samples']} samples per question, majority share >= {ref['threshold']}): "
        f"{ref['labelled']} of {ref['heldout']} held-out questions had a majority and are scored; "
        "brackets: 95% Wilson interval."
    )


def _acc(m: dict[str, Any], key: str = "accuracy") -> str:
    """A rate with its 95% interval; results cached before intervals existed get one from n."""
    x, n = m.get(key), m.get("n")
    if x is None:
        return "-"
    return pct(x, m.get(f"{key}_ci") or (wilson(round(x * n), n) if n else None))


def summary_table(result: dict[str, Any]) -> str:
    """Markdown: what the accuracies are scored against, then teacher, baseline, each student side by side."""
    lines = [
        reference_line(result.get("reference") or {}),
        "",
        "| model | params | accuracy (explain) | accuracy (answer) | all steps right | complete | "
        "consistent | mean tokens | latency s | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    t = result.get("teacher")
    if t:
        e = t["explain"]
        p = f"{t['params'] / 1e6:.1f}M" if t.get("params") else "-"
        lines.append(
            f"| teacher {t['spec']} (greedy) | {p} | {_acc(e)} | - | "
            f"{_acc(e, 'steps_all_right')} | {_acc(e, 'complete')} | {pct(e['consistent'])} | "
            f"{t['mean_new_tokens']:.0f} | "
            f"{t['latency_s']:.2f} | {t['tokens_per_s']:.0f} |"
        )
    b = result["baseline"]
    lines.append(f"| trivial baseline | - | - | {_acc(b)} | - | - | - | - | - | - |")
    for name, s in result.get("students", {}).items():
        e, a = s["explain"], s["answer"]
        lines.append(
            f"| student {name} | {s['params'] / 1e6:.2f}M | {_acc(e)} | {_acc(a)} | "
            f"{_acc(e, 'steps_all_right')} | {_acc(e, 'complete')} | {pct(e['consistent'])} | "
            f"{e['mean_new_tokens']:.0f} | "
            f"{s.get('latency_s', 0):.2f} | {s.get('tokens_per_s', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def student_md(
    name: str, s: dict[str, Any], base: dict[str, Any], teacher: dict | None, ref: dict[str, Any]
) -> str:
    lines = [f"# eval: student {name}", "", f"Held-out questions: {s['explain']['n']}.", ""]
    lines.append(
        summary_table({"teacher": teacher, "baseline": base, "students": {name: s}, "reference": ref})
    )
    lines += ["", "## Samples", ""]
    for x in s["samples"]:
        lines += [
            f"- **{x['question']}** (gold {x['gold']})",
            f"  - answer mode: `{x['answer_mode'].strip()}`",
            "  - explain mode: `" + " / ".join(x["explain_mode"].strip().splitlines()) + "`",
        ]
    return "\n".join(lines) + "\n"
