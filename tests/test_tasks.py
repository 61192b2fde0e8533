"""distill.tasks: task specs, deterministic draws, gold checks, full-credit scoring, disjoint splits."""

from __future__ import annotations

import json
import re

import pytest
from nestling.distill.tasks import (
    DEFAULT_TASK,
    Example,
    load_task,
    normalize_question,
    split_examples,
)

from nestling.core.errors import NestlingError
from nestling.core.explain import normalize_answer, safe_eval

EASY = "rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=1&allow_parentheses=false"


def test_rg_draw_is_deterministic_distinct_and_ids_are_stable():
    task = load_task(EASY)
    a, b = task.examples(60, seed=3), task.examples(60, seed=3)
    assert [e.to_row() for e in a] == [e.to_row() for e in b]
    assert len({normalize_question(e.question) for e in a}) == 60
    assert [e.id for e in a] == [f"q{i:06d}" for i in range(60)]
    other = task.examples(60, seed=4)
    # reasoning-gym would shift seed 3's items by one for seed 4; the draws must really differ.
    assert len({e.question for e in other} & {e.question for e in a}) < 50


def test_wrong_division_golds_are_excluded_and_counted():
    # reasoning-gym 0.1.25 keeps the original divisor in the text but answers with a re-drawn one.
    task = load_task(EASY)
    examples = task.examples(100, seed=0)
    assert task.stats()["wrong_gold_excluded"] > 0
    assert any("/" in ex.question for ex in examples)
    for ex in examples:
        assert normalize_answer(ex.gold) == normalize_answer(str(safe_eval(ex.meta["expression"])))


def test_rg_score_gives_full_credit_only_and_accepts_numeric_spellings():
    task = load_task("rg:letter_counting?min_words=1&max_words=2")
    ex = task.examples(5)[0]
    assert task.score(ex.gold, ex)
    assert task.score(f"{ex.gold}.0", ex)
    assert not task.score(str(int(ex.gold) + 1), ex)
    assert not task.score(None, ex)
    # reasoning-gym gives partial credit for answers that merely contain the gold; that is not correct.
    assert not task.score(f"{ex.gold} or {int(ex.gold) + 1}", ex)


def test_extract_survives_models_that_ignore_the_format():
    task = load_task(EASY)
    assert task.extract("Step 1: 3 + 4 = 7.\nAnswer: 7") == "7"
    assert task.extract("so the answer is 12.") == "12"
    assert task.extract("3 and 4 make 7") == "7"
    assert task.extract("no idea") is None


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("rg:no_such_dataset", "no dataset"),
        ("rg:basic_arithmetic?bogus_key=1", "bad config"),
        ("rg:basic_arithmetic?min_terms", "bad query"),
        ("nope:x", "unknown kind"),
        ("file:/nonexistent/q.jsonl", "not found"),
        ("mix:", "empty mix"),
        ("rg:basic_arithmetic?operators=/", "cannot generate"),
    ],
)
def test_bad_task_specs_raise_one_line_errors(spec, fragment):
    with pytest.raises(NestlingError, match=fragment) as e:
        load_task(spec).examples(3)
    assert "\n" not in str(e.value)


def test_mix_splits_n_interleaves_and_scores_by_the_source_task():
    task = load_task(DEFAULT_TASK)
    ex = task.examples(20, seed=0)
    kinds = [e.task.split("?")[0] for e in ex]
    assert kinds.count("rg:basic_arithmetic") == 10 and kinds.count("rg:chain_sum") == 10
    assert kinds[:4] == ["rg:basic_arithmetic", "rg:chain_sum"] * 2
    assert len({e.id for e in ex}) == 20
    assert all(task.score(e.gold, e) for e in ex)
    assert not any(task.score(str(int(e.gold) + 1), e) for e in ex)


def test_mix_parts_keep_comma_lists_in_their_queries():
    task = load_task(
        "mix:rg:basic_arithmetic?operators=+,-&max_digits=1&max_terms=2,rg:chain_sum?max_terms=2"
    )
    assert [t.name.split("?")[0] for t in task.parts] == ["rg:basic_arithmetic", "rg:chain_sum"]
    assert task.parts[0].config["operators"] == ["+", "-"]


def test_file_tasks_jsonl_csv_custom_columns_and_missing_gold(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(
        json.dumps({"q": "What is 2 + 2?", "a": "4"})
        + "\n\n"
        + json.dumps({"q": "Name a colour.", "a": ""})
        + "\n"
    )
    task = load_task(f"file:{p}?question=q&answer=a")
    ex = task.examples(10)
    assert [(e.question, e.gold) for e in ex] == [("What is 2 + 2?", "4"), ("Name a colour.", None)]
    assert task.score("4.0", ex[0]) and not task.score("5", ex[0]) and not task.score("red", ex[1])
    c = tmp_path / "q.csv"
    c.write_text("question,answer\nHow many legs has a cat?,4\nCapital of France?,Paris\n")
    task = load_task(f"file:{c}")
    ex = task.examples(10)
    assert task.score(" paris. ", ex[1]) and task.score("4", ex[0])


def test_file_tasks_reject_malformed_rows_with_line_numbers(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "ok?", "answer": "1"}\n{"question": broken\n')
    with pytest.raises(NestlingError, match="line 2"):
        load_task(f"file:{p}")
    p.write_text('{"question": "ok?"}\n{"prompt": "where is the question?"}\n')
    with pytest.raises(NestlingError, match="row 2.*question=COLUMN"):
        load_task(f"file:{p}")
    p2 = tmp_path / "q.txt"
    p2.write_text("x")
    with pytest.raises(NestlingError, match="suffix"):
        load_task(f"file:{p2}")


def test_hf_local_dataset_with_gsm8k_answers(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {
        "question": [
            "Tom has 3 apples and buys 4. How many?",
            "A box holds 1,200 pens; 200 go. How many left?",
        ],
        "answer": ["3 + 4 = <<3+4=7>>7\n#### 7", "1200 - 200 = 1000\n#### 1,000"],
    }
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "gsm"))
    task = load_task(f"hf:{tmp_path / 'gsm'}?split=train")
    ex = task.examples(10)
    assert [e.gold for e in ex] == ["7", "1000"]
    assert "<<3+4=7>>" in ex[0].meta["solution"]
    assert task.score("1,000", ex[1])
    with pytest.raises(NestlingError, match="cannot load"):
        load_task(f"hf:{tmp_path / 'gsm'}?split=nosuchsplit")


def _examples(questions):
    return [Example(f"q{i:06d}", "t", q, "1", {}) for i, q in enumerate(questions)]


def test_split_is_disjoint_by_normalised_text_and_deterministic():
    qs = [f"What is {i} + 1?" for i in range(50)]
    # The same question in another case / spacing must land in the same split as its twin.
    qs += [f"what  is {i} + 1?" for i in range(0, 50, 5)]
    ex = _examples(qs)
    train, held = split_examples(ex, 0.2, seed=7)
    assert {normalize_question(e.question) for e in train}.isdisjoint(
        {normalize_question(e.question) for e in held}
    )
    assert len({normalize_question(e.question) for e in held}) == 10
    assert len(train) + len(held) == len(ex)
    again = split_examples(ex, 0.2, seed=7)
    assert [e.id for e in again[1]] == [e.id for e in held]
    assert [e.id for e in split_examples(ex, 0.2, seed=8)[1]] != [e.id for e in held]
    assert len(split_examples(ex, 5, seed=0)[1]) == len(
        [
            e
            for e in ex
            if normalize_question(e.question)
            in {normalize_question(x.question) for x in split_examples(ex, 5, 0)[1]}
        ]
    )
    with pytest.raises(NestlingError):
        split_examples(ex, 500)


def test_rg_pool_split_has_no_overlap_even_though_seeds_shift_items():
    task = load_task(EASY)
    ex = task.examples(120, seed=0)
    train, held = split_examples(ex, 30, seed=0)
    assert len(held) == 30 and len(train) == 90
    assert not {normalize_question(e.question) for e in train} & {
        normalize_question(e.question) for e in held
    }


def test_example_row_round_trip():
    ex = load_task(EASY).examples(3)[2]
    row = json.loads(json.dumps(ex.to_row()))
    assert Example.from_row(row).to_row() == row
    with pytest.raises(NestlingError):
        Example.from_row({"id": "x"})


def test_trivial_baseline_is_per_task_and_scored_by_the_task():
    from nestling.distill.tasks import Example, trivial_baseline

    def ex(i, task, gold):
        return Example(id=str(i), task=task, question=f"q{i}", gold=gold)

    train = [ex(0, "a", "1"), ex(1, "a", "1"), ex(2, "a", "2"), ex(3, "b", "x"), ex(4, "b", None)]
    held = [ex(5, "a", "1"), ex(6, "a", "3"), ex(7, "b", "x"), ex(8, "b", "y")]
    base = trivial_baseline(train, held, lambda answer, e: answer == e.gold)
    assert base["answers"] == {"a": "1", "b": "x"}
    assert base["train_accuracy"] == pytest.approx(3 / 4)  # the gold-less row is not graded
    assert base["heldout_accuracy"] == base["accuracy"] == pytest.approx(2 / 4)
    assert base["n"] == 4


def test_split_keeps_one_expression_on_one_side_whatever_its_wording():
    wordings = ("What is {}?", "Calculate {}.", "Solve: {} =")
    ex = [
        Example(f"q{i:06d}", "t", w.format(f"{i} + 1"), str(i + 1), {"expression": f"{i} + 1"})
        for i in range(40)
        for w in wordings[: 1 + i % 3]
    ]
    train, held = split_examples(ex, 20, seed=3)
    assert len(held) == 20 and len(train) == len(ex) - 20
    assert {e.meta["expression"] for e in train}.isdisjoint({e.meta["expression"] for e in held})
    # Only the expression ties these: "3+1" and "3 + 1" are one expression.
    twins = [Example("a", "t", "Add 3 and 1.", "4", {"expression": "3+1"}), *ex]
    tr, he = split_examples(twins, 0.5, seed=0)
    assert ("3 + 1" in {e.meta["expression"] for e in he}) == (twins[0] in he)


def test_the_default_mix_is_half_multi_step_with_200_disjoint_held_out_questions():
    from nestling.distill.traces import TracesConfig

    cfg = TracesConfig()
    task = load_task(cfg.task)
    ex = task.examples(cfg.n, cfg.seed)
    train, held = split_examples(ex, cfg.heldout, cfg.seed)
    assert len(held) >= 200 and len(ex) == cfg.n
    for key in (lambda e: normalize_question(e.question), lambda e: "".join(e.meta["expression"].split())):
        assert {key(e) for e in train}.isdisjoint({key(e) for e in held})
    terms = [len(re.findall(r"\d+", e.meta["expression"])) for e in held]
    assert terms.count(3) >= 90 and terms.count(2) >= 90  # a multi-step half and the easy curriculum
    assert all(task.score(e.gold, e) for e in held)


def test_one_scorer_scores_a_row_an_example_and_an_index_alike():
    """eval (extract + score), export (scorer(text, item)) and run's latency scoring (by_index) agree."""
    from nestling.distill.tasks import Example, TaskScorer

    rows = [{"id": "q1", "task": "rg:basic_arithmetic", "question": "What is 3 + 4?", "gold": "7"}]
    scorer = TaskScorer()
    for text in ("Step 1: 3 + 4 = 7\nAnswer: 7", "Step 1: 3 + 4 = 8\nAnswer: 8"):
        want = scorer.score(rows[0], scorer.extract(rows[0], text))
        assert scorer(text, rows[0]) == scorer(text, Example.from_row(rows[0])) == want
        assert scorer.by_index(rows)(0, text) == want
    assert TaskScorer().by_index([{**rows[0], "gold": None}]) is None  # nothing to score against
