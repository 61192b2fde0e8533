"""distill.filters: only right answers with right steps survive; every drop is counted."""

from __future__ import annotations

import pytest
from nestling.distill.filters import FilterConfig, filter_traces, vote_labels
from nestling.distill.tasks import Example

from nestling.core.errors import NestlingError

TASK = "rg:basic_arithmetic"


def rec(qid, j, rationale, answer, correct, **kw):
    return {
        "id": f"{qid}:{j}",
        "qid": qid,
        "sample": j,
        "task": TASK,
        "rationale": rationale,
        "answer": answer,
        "correct": correct,
        **kw,
    }


@pytest.fixture
def examples():
    return [
        Example("q1", TASK, "Calculate 9 + 8.", "17", {}),
        Example("q2", TASK, "Calculate 3 * 4.", "12", {}),
        Example("q3", TASK, "Name the 2nd prime.", None, {}),
    ]


def test_filters_keep_only_verified_rationales_with_true_steps(examples):
    records = [
        rec("q1", 0, "Step 1: 9 + 8 = 17.\nAnswer: 17", "17", True),
        rec("q1", 1, "9 times 8 is 64, so 9 + 8 = 17.\nAnswer: 17", "17", True),  # right answer, wrong step
        rec("q1", 2, "Step 1: 9 + 8 = 17.\nAnswer: 17", "17", True),  # duplicate of sample 0
        rec("q1", 3, "Step 1: 9 + 8 = 16.\nAnswer: 16", "16", False),
        rec("q2", 0, "I am not sure.", None, False),  # format-broken
        rec("q2", 1, "Step 1: 3 * 4 = 12.\nStep 2:", "12", True, truncated=True),  # cut off
        rec("q2", 2, "Step 1: 3 * 4 = 12.\nStep 2: 12 + 1 = 13.\nAnswer: 12", "12", True),  # inconsistent
        rec("q2", 3, "Sure!\nStep 1: 3 times 4 is 12.\nThe answer is 12.\nAnswer: 12", "12", True),
        rec("q9", 0, "Step 1: 1 + 1 = 2", "2", True),  # not a training question: ignored
    ]
    kept, stats = filter_traces(records, examples, FilterConfig())
    assert [(r["qid"], r["steps"], r["source"], r["trace"]) for r in kept] == [
        ("q1", ["9 + 8 = 17."], "verified", "q1:0"),
        ("q2", ["3 times 4 is 12."], "verified", "q2:3"),
    ]
    by_name = {f["name"]: (f["in"], f["kept"]) for f in stats["filters"]}
    assert by_name == {
        "format": (8, 7),
        "length": (7, 6),
        "correct": (6, 5),
        "steps": (5, 3),
        "dedupe": (3, 2),
    }
    assert stats["right_answer_wrong_steps"] == 1 and stats["right_answer_inconsistent_steps"] == 1
    assert stats["questions_covered"] == 2 and stats["coverage"] == pytest.approx(2 / 3, abs=1e-3)


def test_step_check_can_be_turned_off(examples):
    records = [rec("q1", 1, "9 times 8 is 64, so 9 + 8 = 17.\nAnswer: 17", "17", True)]
    assert filter_traces(records, examples, FilterConfig(check_steps=False))[0]
    assert not filter_traces(records, examples, FilterConfig())[0]


def test_grounded_filter_drops_right_answers_whose_steps_ignore_the_question(examples):
    records = [
        rec("q1", 0, "Step 1: 9 + 8 = 17.\nAnswer: 17", "17", True),
        rec("q1", 1, "Step 1: 10 + 7 = 17.\nAnswer: 17", "17", True),  # right answer, numbers from nowhere
        rec("q1", 2, "Step 1: 9 + 8 = 17.\nStep 2: 17 + 0 = 17.\nAnswer: 17", "17", True),  # 0 from nowhere
        rec("q2", 0, "Step 1: 3 * 4 = 12.\nAnswer: 12", "12", True),
        rec("q2", 1, "Step 1: 6 * 2 = 12.\nAnswer: 12", "12", True),
    ]
    kept, stats = filter_traces(records, examples)
    assert [r["trace"] for r in kept] == ["q1:0", "q2:0"]
    assert stats["right_answer_ungrounded_steps"] == 3 and stats["grounding"] == "grounded"
    loose, loose_stats = filter_traces(records, examples, FilterConfig(grounding="checked"))
    assert len(loose) == 5 and loose_stats["right_answer_ungrounded_steps"] == 0
    with pytest.raises(NestlingError, match="grounding"):
        FilterConfig(grounding="strict")


def test_vote_labels_questions_without_gold(examples):
    records = [
        rec("q3", 0, "Primes are 2, 3. Answer: 3", "3", None),
        rec("q3", 1, "The second prime is 3.\nAnswer: 3", "3", None),
        rec("q3", 2, "It is 5.\nAnswer: 5", "5", None),
        rec("q3", 3, "No answer here at all", None, None),
    ]
    assert vote_labels(records, FilterConfig(vote_threshold=0.6)) == {"q3": "3"}
    assert vote_labels(records, FilterConfig(vote_threshold=0.7)) == {}
    assert (
        vote_labels(records[:1] + records[2:3], FilterConfig(vote_threshold=0.5)) == {}
    )  # 1 vote < min_votes
    kept, stats = filter_traces(records, examples, FilterConfig(vote_threshold=0.6))
    assert {r["source"] for r in kept} == {"vote"} and {r["answer"] for r in kept} == {"3"}
    assert len(kept) == 2 and stats["vote"]["labelled"] == 1
    kept, _ = filter_traces(records, examples, FilterConfig(vote_threshold=0.9))
    assert kept == []


def test_looping_and_over_long_rationales_are_dropped(examples):
    loop = "\n".join(["9 + 8 = 17."] * 6) + "\nAnswer: 17"
    many = "\n".join(f"Step {i}: {i} + 0 = {i}." for i in range(1, 15)) + "\nStep 15: 9 + 8 = 17.\nAnswer: 17"
    kept, stats = filter_traces([rec("q1", 0, loop, "17", True), rec("q1", 1, many, "17", True)], examples)
    assert kept == []
    assert [f["kept"] for f in stats["filters"]][:2] == [1, 0]


@pytest.mark.parametrize(
    "kw", [{"vote_threshold": 0}, {"vote_threshold": 1.5}, {"min_votes": 0}, {"max_steps": 0}]
)
def test_bad_filter_config(kw):
    with pytest.raises(NestlingError):
        FilterConfig(**kw)
