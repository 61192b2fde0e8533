"""Filters: from raw teacher samples to training rows whose answers AND steps check out.

    kept, stats = filter_traces(records, train_examples, FilterConfig())
    kept[0] == {"qid": "q000003", "task": "rg:...", "question": "...", "answer": "7",
                "steps": ["3 + 4 = 7"], "source": "verified", "trace": "q000003:1"}

Filters run in this order, each counted in ``stats["filters"]`` (in, kept, yield):
    format    an answer was extracted and at least one step remains after cleaning
    length    not cut off by max_tokens; a rationale without a chain also has at most max_steps steps and
              max_chars characters (a reasoning chain is long by nature: only truncation drops it)
    correct   matches the gold answer; questions without gold use a self-consistency vote (the majority
              answer of the k samples is the label when its share reaches vote_threshold)
    steps     no false step (every arithmetic / per-task claim holds) and the last stated result is the
              answer; with grounding "grounded" (the default) also every step grounded in the question
              (core.explain.ground: its numbers are the question's or earlier results) and the answer
              derived from the steps, where grounding applies (arithmetic and word problems);
              right-answer-wrong-steps and right-answer-ungrounded rationales are counted separately
    dedupe    one copy of each distinct step list per question

A reasoning teacher's record carries its chain apart from the answer part (``chain``); its steps are the
chain's followed by the answer part's, split from free-form text by core.explain.parse_steps, and every one
is checked. Kept rows carry two rationale styles, both checked the same way:
    steps_full    every step the teacher wrote
    steps_short   the steps that carry a checkable claim (each distinct claim once), plus the conclusion;
                  small students learn better from short chains (Li et al. 2025, "Small Models Struggle to
                  Learn from Strong Reasoners")
``steps`` is the style FilterConfig.style chose; ``training_text(row, style)`` renders either for training.
A rationale without a chain has one style: both equal ``steps``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nestling.distill.tasks import Example

from nestling.core.config import check
from nestling.core.explain import (
    check_step,
    check_steps,
    clean_steps,
    explanation_consistent,
    ground,
    normalize_answer,
    parse_steps,
)
from nestling.core.prompting import explain_target

RATIONALE_STYLES = ("full", "short")
GROUNDING = ("grounded", "checked")


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
    grounding: str = field(
        default="grounded",
        metadata={
            "help": "grounded: also drop chains with a step not grounded in the question or an answer the "
            "steps do not derive (arithmetic and word problems); checked: only false steps",
            "choices": GROUNDING,
        },
    )
    max_steps: int = field(default=12, metadata={"help": "drop rationales with more steps (rambling)"})
    max_chars: int = field(default=1500, metadata={"help": "drop rationales longer than this"})
    style: str = field(
        default="full", metadata={"help": "rationale style of a kept row's steps: full or short"}
    )

    def __post_init__(self) -> None:
        check(
            0 < self.vote_threshold <= 1, f"vote_threshold {self.vote_threshold}: must be in (0, 1], e.g. 0.5"
        )
        check(self.min_votes >= 1, f"min_votes {self.min_votes}: must be >= 1")
        check(self.max_steps >= 1, f"max_steps {self.max_steps}: must be >= 1")
        check(self.max_chars >= 1, f"max_chars {self.max_chars}: must be >= 1")
        check(
            self.style in RATIONALE_STYLES, f"style {self.style!r}: use one of {', '.join(RATIONALE_STYLES)}"
        )
        check(self.grounding in GROUNDING, f"grounding {self.grounding!r}: use one of {', '.join(GROUNDING)}")


def record_steps(record: dict, task: str | None = None) -> tuple[list[str], list[str]]:
    """(full, short) steps of a trace record; the same list twice when the teacher wrote no chain."""
    answer_part = clean_steps(parse_steps(record.get("rationale") or ""))
    if not record.get("chain"):
        return answer_part, answer_part
    full = clean_steps(parse_steps(record["chain"])) + answer_part
    return full, shorten(full, task)


def shorten(steps: list[str], task: str | None = None) -> list[str]:
    """The steps that state a new checkable claim, in order, then the conclusion (the last step)."""
    short: list[str] = []
    seen: set[tuple[str, str]] = set()
    for step in steps:
        claims = {(c.expr, c.stated) for c in check_step(step, task).claims}
        if claims - seen:
            short.append(step)
            seen |= claims
    if steps and (not short or short[-1] != steps[-1]):
        short.append(steps[-1])
    return short


def training_steps(row: dict, style: str | None = None) -> list[str]:
    """The steps of a kept row in `style` (full | short); None = the style the traces stage chose.
    Rows written before both styles were stored carry only ``steps``."""
    if style is None:
        return list(row["steps"])
    check(style in RATIONALE_STYLES, f"rationale style {style!r}: use one of {', '.join(RATIONALE_STYLES)}")
    return list(row.get(f"steps_{style}") or row["steps"])


def training_text(row: dict, style: str | None = None) -> str:
    """The explain-mode target a student learns from a kept row: core.prompting's canonical rationale."""
    return explain_target(training_steps(row, style), str(row["answer"]))


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


FILTERS = ["format", "length", "correct", "steps", "dedupe"]


def filter_traces(
    records: list[dict], examples: list[Example], cfg: FilterConfig | None = None
) -> tuple[list[dict], dict[str, Any]]:
    """(kept rows, stats); records of questions not in `examples` (e.g. held-out) are ignored."""
    cfg = cfg or FilterConfig()
    by_id = {ex.id: ex for ex in examples}
    records = [r for r in records if r.get("qid") in by_id]
    labels = vote_labels([r for r in records if by_id[r["qid"]].gold is None], cfg)
    passed = dict.fromkeys(FILTERS, 0)
    dropped_steps = {"wrong": 0, "inconsistent": 0, "ungrounded": 0}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    kept: list[dict] = []
    for r in records:
        failed, row = _judge(r, by_id[r["qid"]], cfg, labels)
        if failed in dropped_steps:
            dropped_steps[failed] += 1
        stage = "steps" if failed in dropped_steps else failed or "dedupe"
        for name in FILTERS[: FILTERS.index(stage)]:  # the filters it passed before the one it failed
            passed[name] += 1
        if row is None:
            continue
        key = (row["qid"], tuple(" ".join(s.lower().split()) for s in row.pop("_steps")))
        if key not in seen:
            seen.add(key)
            passed["dedupe"] += 1
            kept.append(row)
    return kept, _filter_stats(records, examples, kept, passed, dropped_steps, labels, cfg)


def _judge(r: dict, ex: Example, cfg: FilterConfig, labels: dict[str, str]) -> tuple[str | None, dict | None]:
    """(the filter the record fails first, or "wrong"/"inconsistent" when its steps fail, else None; the
    training row when it passes everything but dedupe)."""
    steps, short = record_steps(r, r.get("task") or ex.task)
    if r.get("answer") is None or not steps or _degenerate(steps):
        return "format", None
    too_long = len(steps) > cfg.max_steps or len(r.get("rationale") or "") > cfg.max_chars
    if r.get("truncated") or (too_long and not r.get("chain")):
        return "length", None
    if ex.gold is not None:
        answer, source, ok = ex.gold, "verified", bool(r.get("correct"))
    else:
        answer, source = labels.get(ex.id), "vote"
        ok = answer is not None and normalize_answer(r["answer"]) == normalize_answer(answer)
    if not ok or answer is None:
        return "correct", None
    if cfg.check_steps and any(c.ok is False for c in check_steps(steps, r.get("task") or ex.task)):
        return "wrong", None
    if cfg.require_consistent and not explanation_consistent(steps, answer):
        return "inconsistent", None
    if cfg.check_steps and cfg.grounding == "grounded":
        e = ground(ex.question, steps, answer, r.get("task") or ex.task)
        if e.grounding and not e.complete:
            return "ungrounded", None
    row = {
        "qid": ex.id,
        "task": ex.task,
        "question": ex.question,
        "answer": answer,
        "steps": short if cfg.style == "short" else steps,
        "source": source,
        "trace": r.get("id"),
        "_steps": steps,
    }
    if r.get("chain"):
        row.update(steps_full=steps, steps_short=short, chain_source=r.get("chain_source"))
    return None, row


def _filter_stats(
    records: list[dict],
    examples: list[Example],
    kept: list[dict],
    passed: dict[str, int],
    dropped_steps: dict[str, int],
    labels: dict[str, str],
    cfg: FilterConfig,
) -> dict[str, Any]:
    filters, prev = [], len(records)
    for n in FILTERS:
        filters.append(
            {"name": n, "in": prev, "kept": passed[n], "yield": round(passed[n] / prev, 4) if prev else 0.0}
        )
        prev = passed[n]
    covered = {row["qid"] for row in kept}
    chained = [row for row in kept if "steps_full" in row]

    def mean(key: str) -> float | None:
        return round(sum(len(row[key]) for row in chained) / len(chained), 2) if chained else None

    return {
        "records": len(records),
        "filters": filters,
        "right_answer_wrong_steps": dropped_steps["wrong"],
        "right_answer_inconsistent_steps": dropped_steps["inconsistent"],
        "right_answer_ungrounded_steps": dropped_steps["ungrounded"],
        "grounding": cfg.grounding if cfg.check_steps else "off",
        "kept": len(kept),
        "yield": round(len(kept) / len(records), 4) if records else 0.0,
        "questions": len(examples),
        "questions_covered": len(covered),
        "styles": {
            "rows_with_chain": len(chained),
            "mean_steps_full": mean("steps_full"),
            "mean_steps_short": mean("steps_short"),
            "style": cfg.style,
        },
        "coverage": round(len(covered) / len(examples), 4) if examples else 0.0,
        "vote": {
            "questions_without_gold": sum(ex.gold is None for ex in examples),
            "labelled": len(labels),
            "threshold": cfg.vote_threshold,
        },
    }
