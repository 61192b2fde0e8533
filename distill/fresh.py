"""Fresh training questions: drawn from the task's generator, never a held-out one, answered by a model.

    exs = draw_fresh("rg:basic_arithmetic", RunDir(run).questions(), n=400, seed=0)
    rows, stats = fresh_rows(model, tok, exs, progress=True)   # verified rows, as the traces stage keeps

A small traces stage without a teacher server: the compress stage's source answers in the student format,
and the same filters as ``nestling traces`` keep what is right with no false step. train's on-policy prompts
draw from here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nestling.core.explain import extract_answer
from nestling.core.prompting import student_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Fresh rationales: the explain-mode budget the student format needs, generated in batches of this size.
MAX_NEW_TOKENS, BATCH = 96, 32


def _expr_key(expr: Any) -> str | None:
    return "expr:" + " ".join(expr.split()) if isinstance(expr, str) else None


def held_keys(questions: list[dict]) -> set[str]:
    """Normalised question texts and expressions of the held-out split: a fresh question matching either
    is refused (the same sum asked in other words is still a held-out question)."""
    from nestling.distill.tasks import normalize_question

    keys = set()
    for r in questions:
        if r.get("split") == "heldout":
            keys.add(normalize_question(r["question"]))
            if expr := _expr_key((r.get("meta") or {}).get("expression")):
                keys.add(expr)
    return keys


def draw_fresh(task_spec: str, questions: list[dict], n: int, seed: int) -> list[Any]:
    """Up to n task questions that are not in the run (train or held-out) and share no expression with a
    held-out question; drawn with a seed the run never used."""
    from nestling.distill.tasks import load_task, normalize_question

    if n == 0:
        return []
    held = held_keys(questions)
    seen = {normalize_question(r["question"]) for r in questions}
    out = []
    for ex in load_task(task_spec).examples(4 * n, seed=seed + 7919):
        key = normalize_question(ex.question)
        if key in seen or key in held or _expr_key(ex.meta.get("expression")) in held:
            continue
        seen.add(key)
        ex.id = f"fresh{len(out):06d}"
        out.append(ex)
        if len(out) == n:
            break
    return out


def fresh_rows(
    model: PreTrainedModel, tok: PreTrainedTokenizerFast, examples: list, progress: bool
) -> tuple[list[dict], dict[str, Any]]:
    """`model` answers `examples` greedily in explain mode; the traces stage's filters keep the rows with a
    right answer and no false step. Returns (kept rows, filter stats)."""
    from nestling.distill.evaluate import generate
    from nestling.distill.filters import filter_traces
    from nestling.distill.tasks import TaskScorer

    if not examples:
        return [], {}
    prompts = [student_prompt(ex.question) for ex in examples]
    texts, counts, _ = generate(model, tok, prompts, MAX_NEW_TOKENS, BATCH, "fresh rationales", progress)
    scorer = TaskScorer()
    records = []
    for ex, text, n in zip(examples, texts, counts, strict=True):
        answer = extract_answer(text)
        records.append(
            {
                "id": ex.id + ":0",
                "qid": ex.id,
                "task": ex.task,
                "rationale": text,
                "answer": answer,
                "correct": answer is not None and scorer.score_example(ex, answer),
                "truncated": n >= MAX_NEW_TOKENS,
            }
        )
    kept, stats = filter_traces(records, examples)
    for r in kept:
        r["source"] = "fresh"
    return kept, stats
