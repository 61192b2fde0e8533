"""serve.explain: answer extraction, step parsing/cleaning and the per-task step checkers."""

from __future__ import annotations

import pytest

from nestling.serve.explain import (
    STEP_CHECKERS,
    answers_match,
    check_step,
    check_steps,
    clean_steps,
    explanation_consistent,
    extract_answer,
    letter_count_claims,
    parse_steps,
    register_step_checker,
    safe_eval,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Step 1: 9 + 8 = 17.\nAnswer: 17", "17"),
        ("**Answer:** 7", "7"),
        ("We get 12. So the answer is 12.", "12"),
        ("The final answer is $\\boxed{42}$", "42"),
        ("first 3, then 5, finally 8", "8"),
        ("Answer: -4", "-4"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_extract_answer_fallbacks(text, expected):
    assert extract_answer(text) == expected


def test_answers_match_numeric_and_text():
    assert (
        answers_match("17.0", "17") and answers_match("1,000", "1000") and answers_match(" Paris. ", "paris")
    )
    assert not answers_match("18", "17") and not answers_match(None, "1")


def test_parse_steps_strips_numbering_markdown_and_the_answer_line():
    text = "**Step 1:** 3 + 4 = 7.\n2. Then 7 * 2 = 14.\n- done\n**Answer:** 14"
    assert parse_steps(text) == ["3 + 4 = 7.", "Then 7 * 2 = 14.", "done"]
    assert parse_steps("2**3 = 8") == ["2**3 = 8"]  # a power, not bold


def test_clean_steps_drops_filler_and_restated_answers_but_keeps_content():
    steps = ["Sure! Let's solve it.", "3 + 4 = 7", "The answer is 7.", 'The word "tree" has 2 e\'s.']
    assert clean_steps(steps) == ["3 + 4 = 7", 'The word "tree" has 2 e\'s.']
    # A restatement that carries a checkable claim stays (so a false one can still be caught).
    assert clean_steps(["So the answer is 3 + 4 = 8."]) == ["So the answer is 3 + 4 = 8."]
    assert clean_steps(["Let's add 3 and 4 to get 7"]) == ["Let's add 3 and 4 to get 7"]
    assert clean_steps(["Question: ?", "Question: 0 + 2 = 2", "Second: 6 - 1 = 5."]) == [
        "0 + 2 = 2",
        "6 - 1 = 5.",
    ]


@pytest.mark.parametrize(
    "step, ok",
    [
        ("9 times 8 is 64, so 9 + 8 = 17", False),
        ("9 times 8 is 72", True),
        ("5 - 9 = -4", True),
        ("1 - 6 = 5", False),
        ("the sum of 3 and 4 is 7", True),
        ("10 / 3 = 3.33", True),
        ("6 \u00d7 7 = 48", False),
        ("There is nothing to compute here", None),
        ("2 - 7 = 2 - 7 = -5", True),  # a restated expression is not a claim that 2 - 7 = 2
        ("3 + 4 = 7 + 1 = 8", False),  # running totals: 3 + 4 is not 7 + 1
        ("(2 + 3) * 4 = 5 * 4 = 20", True),
    ],
)
def test_arithmetic_step_checks(step, ok):
    assert check_step(step).ok is ok


def test_safe_eval_never_executes_code():
    assert safe_eval("2 + 3 * (4 - 1) ^ 2") == 29
    for bad in ("__import__('os')", "2 ** 1000000", "1 / 0", "a + 1"):
        with pytest.raises(ValueError):
            safe_eval(bad)


@pytest.mark.parametrize(
    "step, stated, value",
    [
        ('The letter "a" appears 3 times in "banana".', "3", "3"),
        ('"green" has 2 e\'s.', "2", "2"),
        ('There are 3 "r"s in "strawberry".', "3", "3"),
        ('the letter a occurs twice in the word "Banana"', "2", "3"),
        ('The letter "n" appears once in "banana".', "1", "2"),
    ],
)
def test_letter_count_claims(step, stated, value):
    (claim,) = letter_count_claims(step)
    assert (claim.stated, claim.value, claim.ok) == (stated, value, stated == value)


def test_letter_checker_applies_to_letter_counting_and_mixes_only():
    step = 'The letter "n" appears once in "banana".'
    assert check_step(step, "rg:letter_counting?min_words=1").ok is False
    assert check_step(step, "mix:rg:basic_arithmetic?operators=+,-,rg:letter_counting").ok is False
    assert check_step(step, "rg:basic_arithmetic").ok is None
    assert check_step(step).ok is None


def test_register_step_checker_extends_one_task(monkeypatch):
    from nestling.serve.explain import Claim

    monkeypatch.setattr(
        "nestling.serve.explain.STEP_CHECKERS", {k: list(v) for k, v in STEP_CHECKERS.items()}
    )
    never = lambda step: [Claim(step, "x", "y", False)] if "magic" in step else []  # noqa: E731
    register_step_checker(never, tasks=["file:"])
    assert check_steps(["magic word"], "file:x.jsonl")[0].ok is False
    assert check_steps(["magic word"], "rg:chain_sum")[0].ok is None


def test_explanation_consistent():
    assert explanation_consistent(["3 + 4 = 7"], "7")
    assert not explanation_consistent(["3 + 4 = 7", "7 * 2 = 14"], "7")
    assert not explanation_consistent([], "7") and not explanation_consistent(["3 + 4 = 7"], None)


@pytest.mark.parametrize(
    "chain, steps",
    [
        (  # a paragraph whose sentences start with the calculation
            "Okay, I need 23 * 4. Break it down. 20 * 4 = 80. 3 * 4 = 12. Then 80 + 12 = 92.",
            ["Okay, I need 23 * 4.", "Break it down.", "20 * 4 = 80.", "3 * 4 = 12.", "Then 80 + 12 = 92."],
        ),
        (  # bullets and a numbered list, no "Step n:"
            "To compute this:\n* First, 12 + 7 = 19\n- Then 19 * 2 = 38\n1) 38 - 8 = 30",
            ["To compute this:", "First, 12 + 7 = 19", "Then 19 * 2 = 38", "38 - 8 = 30"],
        ),
        ("Decimals stay whole: 3.5 + 1.5 = 5. Done.", ["Decimals stay whole: 3.5 + 1.5 = 5.", "Done."]),
    ],
)
def test_free_form_chains_split_into_steps(chain, steps):
    assert parse_steps(chain) == steps


def test_every_claim_in_a_free_form_chain_is_checked_latex_included():
    chain = (
        "Hmm, let me think.\n\nWe compute \\( 7 \\times 8 = 56 \\). Then\n\\[\n56 \\div 4 = 14\n\\]\n"
        "and $\\frac{14}{2} = 7$. Wait, \\( 3 \\cdot 3 = 10 \\)? No. Also \\frac{1+2}{3} = 1."
    )
    checks = check_steps(clean_steps(parse_steps(chain)))
    claims = [(c.expr, c.stated, c.ok) for s in checks for c in s.claims]
    assert claims == [
        ("7 * 8", "56", True),
        ("56 / 4", "14", True),
        ("14/2", "7", True),
        ("3 * 3", "10", False),
        ("(1+2)/(3)", "1", True),
    ]
