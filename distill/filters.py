"""Filters: from raw teacher samples to training rows whose answers AND steps check out.

    kept, stats = filter_traces(records, train_examples, FilterConfig())
    kept[0] == {"qid": "q000003", "task": "rg:...", "question": "...", "answer": "7",
                "steps": ["3 + 4 = 7"], "source": "verified", "trace": "q000003:1"}

Filters run in this order, each counted in ``stats["filters"]`` (in, kept, yield):
    format    an answer was extracted and at least one step remains after cleaning
    length    not cut off by max_tokens, at most max_steps steps and max_chars characters
    correct   matches the gold answer; questions without gold use a self-consistency vote (the majority
              answer of the k samples is the label when its share reaches vote_threshold)
    steps     no false step (every arithmetic / per-task claim holds) and the last stated result is the
              answer; right-answer-wrong-steps rationales are counted separately
    dedupe    one copy of each distinct step list per question
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nestling.distill.tasks import Example
from nestling.serve.config import check
from nestling.serve.explain import (
    check_steps,
    clean_steps,
    explanation_consistent,
    normalize_answer,
    parse_steps,
)


@dataclass
class FilterConfig:
    vote_threshold: float = field(
        default=0.5,
        metadata={
            "help": "no-gold questions: share of answered samples the majority needs to become the label"
        },
    )
    min_votes: int = field(
        default=2, metadata={"help": "no-gold questions: fewest agreeing samples for a label"}
    )
    check_steps: bool = field(default=True, metadata={"help": "drop rationales with a false step"})
    require_consistent: bool = field(
        default=True, metadata={"help": "drop rationales whose last stated result is not the answer"}
    )
    max_steps: int = field(default=12, metadata={"help": "drop rationales with more steps (rambling)"})
    max_chars: int = field(default=1500, metadata={"help": "drop rationales longer than this"})

    def __post_init__(self) -> None:
        check(
            0 < self.vote_threshold <= 1, f"vote_threshold {self.vote_threshold}: must be in (0, 1], e.g. 0.5"
        )
        check(self.min_votes >= 1, f"min_votes {self.min_votes}: must be >= 1")
        check(self.max_steps >= 1, f"max_steps {self.max_steps}: must be >= 1")
        check(self.max_chars >= 1, f"max_chars {self.max_chars}: must be >= 1")


def _degenerate(steps: list[str]) -> bool:
    """Looping output (the same step over and over) is broken format even if it ends with an answer."""
    return len(steps) >= 4 and len(set(steps)) <= len(steps) // 2


def vote_labels(records: list[dict], cfg: FilterConfig) -> dict[str, str]:
    """qid -> label for questions whose samples agree enough; the label keeps the first raw spelling."""
    by_q: dict[str, list[str]] = {}
    for r in records:
        if r.get("answer") is not None:
            by_q.setdefault(r["qid"], []).append(r["answer"])
    labels: dict[str, str] = {}
    for qid, answers in by_q.items():
        counts = Counter(normalize_answer(a) for a in answers)
        top, votes = counts.most_common(1)[0]
        if votes >= cfg.min_votes and votes / len(answers) >= cfg.vote_threshold:
            labels[qid] = next(a for a in answers if normalize_answer(a) == top)
    return labels


def filter_traces(
    records: list[dict], examples: list[Example], cfg: FilterConfig | None = None
) -> tuple[list[dict], dict[str, Any]]:
    """(kept rows, stats); records of questions not in `examples` (e.g. held-out) are ignored."""
    cfg = cfg or FilterConfig()
    by_id = {ex.id: ex for ex in examples}
    records = [r for r in records if r.get("qid") in by_id]
    labels = vote_labels([r for r in records if by_id[r["qid"]].gold is None], cfg)
    names = ["format", "length", "correct", "steps", "dedupe"]
    passed = {n: 0 for n in names}
    right_wrong_steps = inconsistent = 0
    seen: set[tuple[str, tuple[str, ...]]] = set()
    kept: list[dict] = []
    for r in records:
        ex = by_id[r["qid"]]
        steps = clean_steps(parse_steps(r.get("rationale") or ""))
        if r.get("answer") is None or not steps or _degenerate(steps):
            continue
        passed["format"] += 1
        if r.get("truncated") or len(steps) > cfg.max_steps or len(r.get("rationale") or "") > cfg.max_chars:
            continue
        passed["length"] += 1
        if ex.gold is not None:
            answer, source = ex.gold, "verified"
            ok = bool(r.get("correct"))
        else:
            answer, source = labels.get(ex.id), "vote"
            ok = answer is not None and normalize_answer(r["answer"]) == normalize_answer(answer)
        if not ok or answer is None:
            continue
        passed["correct"] += 1
        if cfg.check_steps and any(c.ok is False for c in check_steps(steps, r.get("task") or ex.task)):
            right_wrong_steps += 1
            continue
        if cfg.require_consistent and not explanation_consistent(steps, answer):
            inconsistent += 1
            continue
        passed["steps"] += 1
        key = (ex.id, tuple(" ".join(s.lower().split()) for s in steps))
        if key in seen:
            continue
        seen.add(key)
        passed["dedupe"] += 1
        kept.append(
            {
                "qid": ex.id,
                "task": ex.task,
                "question": ex.question,
                "answer": answer,
                "steps": steps,
                "source": source,
                "trace": r.get("id"),
            }
        )
    filters = []
    prev = len(records)
    for n in names:
        filters.append(
            {"name": n, "in": prev, "kept": passed[n], "yield": round(passed[n] / prev, 4) if prev else 0.0}
        )
        prev = passed[n]
    covered = {row["qid"] for row in kept}
    stats = {
        "records": len(records),
        "filters": filters,
        "right_answer_wrong_steps": right_wrong_steps,
        "right_answer_inconsistent_steps": inconsistent,
        "kept": len(kept),
        "yield": round(len(kept) / len(records), 4) if records else 0.0,
        "questions": len(examples),
        "questions_covered": len(covered),
        "coverage": round(len(covered) / len(examples), 4) if examples else 0.0,
        "vote": {
            "questions_without_gold": sum(ex.gold is None for ex in examples),
            "labelled": len(labels),
            "threshold": cfg.vote_threshold,
        },
    }
    return kept, stats
