"""Scoring model outputs on held-out questions: accuracy by task and the explanation checks.

    m = score_outputs(rows, texts, TaskScorer(), explain=True)
    m["accuracy"], m["accuracy_ci"], m["steps_all_right"], m["complete"]

Answers are scored by each row's task (distill.tasks.TaskScorer, the one scorer); steps are parsed and
checked by core.explain, the checks the runtime shows. Every rate carries its 95% Wilson interval.
"""

from __future__ import annotations

from typing import Any

from nestling.distill.stats import wilson
from nestling.distill.tasks import TaskScorer

from nestling.core.explain import explanation_consistent, ground, parse_steps


def score_outputs(
    rows: list[dict], texts: list[str], scorer: TaskScorer, explain: bool, answers: list[str] | None = None
) -> dict[str, Any]:
    """Accuracy (overall and by task, each with its 95% Wilson interval); for explanations also step checks,
    consistency and the share of complete explanations (core.explain.ground: every step grounded in the
    question or unchecked, the answer derived from the steps). ``answers``: the texts to extract answers
    from when they differ from ``texts`` (a reasoning teacher's answer part, while its steps come from
    chain + answer)."""
    correct, by_task = [], {}
    all_right, checkable, consistent, complete, ungrounded = 0, 0, 0, 0, 0
    for row, text, answer_text in zip(rows, texts, answers or texts, strict=True):
        answer = scorer.extract(row, answer_text) if answer_text.strip() else None
        ok = scorer.score(row, answer)
        correct.append(ok)
        by_task.setdefault(row["task"], []).append(ok)
        if explain:
            steps = parse_steps(text)
            e = ground(row.get("question") or "", steps, answer, row["task"])
            checked = [c.ok for c in e.steps if c.ok is not None]
            checkable += bool(checked)
            all_right += bool(checked) and all(checked)
            consistent += explanation_consistent(steps, answer)
            complete += e.complete
            ungrounded += any(c.status == "ungrounded" for c in e.steps)
    n = len(rows)
    out: dict[str, Any] = {
        "accuracy": sum(correct) / n,
        "accuracy_ci": wilson(sum(correct), n),
        "n": n,
        "by_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
        "by_task_ci": {t: wilson(sum(v), len(v)) for t, v in sorted(by_task.items())},
        # One character per question in the split's order: an export timed on the first N questions is
        # compared with its PyTorch student on those same N (nestling.report).
        "correct": "".join("1" if ok else "0" for ok in correct),
    }
    if explain:
        out["steps_all_right"] = all_right / n  # every checked step right (and at least one checkable)
        out["steps_all_right_ci"] = wilson(all_right, n)
        out["steps_checkable"] = checkable / n
        out["consistent"] = consistent / n
        out["complete"] = complete / n  # every step grounded or unchecked (one grounded), answer derived
        out["complete_ci"] = wilson(complete, n)
        out["ungrounded"] = ungrounded / n  # a step with a number from nowhere
    return out
