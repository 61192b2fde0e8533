"""core.explain: answer extraction, step parsing/cleaning and the per-task step checkers."""

from __future__ import annotations

from fractions import Fraction

import pytest

from nestling.core.explain import (
    MAX_CHECKED_STEPS,
    MAX_STEP_CHARS,
    STEP_CHECKERS,
    STEP_STATUSES,
    answers_match,
    check_step,
    check_steps,
    clean_steps,
    explanation_consistent,
    extract_answer,
    ground,
    grounding_applies,
    letter_count_claims,
    parse_steps,
    place_value_part,
    place_value_split,
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
    from nestling.core.explain import Claim

    monkeypatch.setattr("nestling.core.explain.STEP_CHECKERS", {k: list(v) for k, v in STEP_CHECKERS.items()})
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


# ---- grounding: steps checked against the question ---------------------------------------------------


def marks(question, text, task=None):
    e = ground(question, parse_steps(text), extract_answer(text), task)
    return [s.status for s in e.steps], e


@pytest.mark.parametrize(
    "question, text, statuses, complete",
    [
        ("Calculate 7 - 3.", "Step 1: 7 - 3 = 4\nAnswer: 4", ["grounded"], True),
        # right arithmetic, wrong question: the headline case
        ("Calculate 7 - 3.", "Step 1: 7 + 3 = 10\nAnswer: 10", ["ungrounded"], False),
        ("Calculate 7 - 3.", "Step 1: 8 - 4 = 4\nAnswer: 4", ["ungrounded"], False),  # right answer by luck
        ("Calculate 7 - 3.", "Step 1: 7 - 3 = 5\nAnswer: 5", ["false"], False),
        ("Calculate 7 - 3.", "Step 1: 7 - 3 = 4\nAnswer: 5", ["grounded"], False),  # answer not derived
        (
            "Calculate 7 - 3.",
            "Step 1: 7 - 3 = 4\nStep 2: So we get 9.\nAnswer: 9",
            ["grounded", "ungrounded"],
            False,
        ),
        (
            "Calculate 7 - 3.",
            "Step 1: Take away.\nStep 2: 7 - 3 = 4\nAnswer: 4",
            ["unchecked", "grounded"],
            True,
        ),
        ("Calculate 2 + 3 + 4.", "Step 1: 2 + 3 = 5\nStep 2: 5 + 4 = 9\nAnswer: 9", ["grounded"] * 2, True),
        (
            "Calculate 2 + 3 + 4.",
            "Step 1: 2 + 3 = 5\nStep 2: 5 * 4 = 20\nAnswer: 20",
            ["grounded"] * 2,
            False,
        ),
        ("Tom has three apples and buys a dozen more.", "3 + 12 = 15\nAnswer: 15", ["grounded"], True),
        ("Ana has twenty-one cards and loses 4.", "21 - 4 = 17\nAnswer: 17", ["grounded"], True),
        ("What is 2 + 3 and 4 + 5?", "2 + 3 = 5\n4 + 5 = 9\nAnswer: 5, 9", ["grounded"] * 2, True),
        ("Calculate 8 / 2.", "Step 1: 4 + 0 = 4\nAnswer: 4", ["ungrounded"], False),  # 8 / 2 states no 4
        ("What is 14 divided by 2?", "Step 1: \\frac{14}{2} = 7\nAnswer: 7", ["grounded"], True),
    ],
)
def test_every_step_is_marked_against_the_question(question, text, statuses, complete):
    got, e = marks(question, text)
    assert got == statuses and e.complete is complete and e.grounding
    assert (e.reason is None) is complete


Q23 = "Calculate 23 * 4."
BOX = "A box holds 23 pens. How many pens in {} boxes?"


@pytest.mark.parametrize(
    "question, text, complete",
    [
        (Q23, "Break it down. 20 * 4 = 80. 3 * 4 = 12. Then 80 + 12 = 92.\nAnswer: 92", True),
        (Q23, "Break 23 into 20 and 3. 4 * 20 = 80. 4 * 3 = 12. 80 + 12 = 92.\nAnswer: 92", True),
        (Q23, "20 + 3 = 23. 20 * 4 = 80. 3 * 4 = 12. 80 + 12 = 92.\nAnswer: 92", True),
        (Q23, "23 * 4 = (20 + 3) * 4 = 20 * 4 + 3 * 4 = 80 + 12 = 92\nAnswer: 92", True),
        (BOX.format(3), "20 * 3 = 60. 3 * 3 = 9. 60 + 9 = 69.\nAnswer: 69", True),
        ("Calculate 47 + 38.", "47 + 30 = 77. 77 + 8 = 85.\nAnswer: 85", True),
        ("Calculate 85 - 38.", "85 - 30 = 55. 55 - 8 = 47.\nAnswer: 47", True),
        ("Calculate 84 / 4.", "80 / 4 = 20. 4 / 4 = 1. 20 + 1 = 21.\nAnswer: 21", True),
        ("Calculate 125 * 4.", "100 * 4 = 400. 25 * 4 = 100. 400 + 100 = 500.\nAnswer: 500", True),
        ("Calculate 23 * 14.", "23 * 10 = 230. 23 * 4 = 92. 230 + 92 = 322.\nAnswer: 322", True),
        # a wrong part, parts that do not sum to 23, overlapping digits, a part left out, a recombination
        # that adds the part instead of its product, a split of a number the question does not state
        (Q23, "30 * 4 = 120. 3 * 4 = 12. 120 + 12 = 132.\nAnswer: 132", False),
        (Q23, "Break 23 into 20 and 4. 20 * 4 = 80. 4 * 4 = 16. 80 + 16 = 96.\nAnswer: 96", False),
        (BOX.format(4), "20 * 4 = 80. 4 * 4 = 16. 80 + 16 = 96.\nAnswer: 96", False),
        (Q23, "13 * 4 = 52. 10 * 4 = 40. 52 + 40 = 92.\nAnswer: 92", False),
        (Q23, "20 * 4 = 80. 3 * 4 = 12.\nAnswer: 80", False),
        (Q23, "20 * 4 = 80. 80 + 3 = 83.\nAnswer: 83", False),
        ("Calculate 47 + 38.", "47 + 30 = 77.\nAnswer: 77", False),
        ("Calculate 47 + 38.", "47 + 30 = 77. 77 + 9 = 86.\nAnswer: 86", False),
        ("Calculate 24 * 4.", "20 * 4 = 80. 3 * 4 = 12. 80 + 12 = 92.\nAnswer: 92", False),
    ],
)  # fmt: skip
def test_place_value_parts_are_grounded_only_as_an_exact_split_recombined(question, text, complete):
    _, e = marks(question, text)
    assert e.complete is complete, (e.reason, [(s.text, s.status, s.reason) for s in e.steps])


def test_a_split_that_never_closes_names_the_part_and_its_number():
    got, e = marks(BOX.format(4), "20 * 4 = 80. 3 * 4 = 12.\nAnswer: 12")
    assert got == ["ungrounded", "ungrounded"] and not e.complete
    why = "20 is a place-value part of 23, but the parts are not all used and recombined"
    assert e.steps[0].reason == why
    assert place_value_split([Fraction(100), Fraction(25)], Fraction(125))
    assert not place_value_split([Fraction(13), Fraction(10)], Fraction(23))
    assert not place_value_split([Fraction(20), Fraction(4)], Fraction(23))
    assert place_value_part(Fraction(20), Fraction(123)) and not place_value_part(Fraction(2), Fraction(23))


def test_a_stated_number_is_never_cut_short():
    # "20 * 4 + 3 * 4 = 80 + 12": the claim is not "= 8" (a false claim on a correct chain)
    assert [c.stated for c in check_step("20 * 4 + 3 * 4 = 80 + 12 = 92").claims if c.stated == "8"] == []


def test_reasons_name_the_number_from_nowhere_and_the_question_asked():
    _, e = marks("Calculate 7 - 3.", "Step 1: 7 - 2 = 5\nAnswer: 5")
    assert e.steps[0].reason == "7 - 2: 2 is not in the question or an earlier step"
    _, e = marks("Calculate 7 - 3.", "Step 1: 7 + 3 = 10\nAnswer: 10")
    assert e.steps[0].reason == "7 + 3: the question asks 7 - 3" and e.on_question is False
    d = e.to_dict()
    assert d["steps"][0]["status"] == "ungrounded" and d["steps"][0]["ok"] is True and not d["complete"]


def test_letter_counts_are_grounded_in_the_quoted_word():
    q = 'How many times does the letter "r" appear in "strawberry"?'
    right = 'The letter "r" appears 3 times in "strawberry".\nAnswer: 3'
    assert marks(q, right, "rg:letter_counting")[1].complete
    got, e = marks(q, 'The letter "r" appears 2 times in "cherry".\nAnswer: 2', "rg:letter_counting")
    assert got == ["ungrounded"] and not e.complete


def test_grounding_is_not_asked_of_questions_without_numbers():
    got, e = marks("Name a prime.", "Step 1: 2 + 1 = 3\nAnswer: 3")
    assert not e.grounding and not e.complete and got == ["ungrounded"]
    assert not grounding_applies("Name the 2nd prime.") and grounding_applies("Calculate 3 + 3.")


@pytest.mark.parametrize(
    "text",
    ["= = =", "((((", "1 / 0 = 5", "2 ^ 99999 = 1", "\\frac{", "\u00d7\u00f7 = 3", "9" * 300 + " + 1 = 2",
     "Step 1: 3 ** ** 4 = 7", "\x00\x01 1 + 1 = 2", "1e308 * 1e308 = inf"],
)  # fmt: skip
def test_a_step_the_parser_cannot_read_is_unchecked_or_false_never_an_exception(text):
    _, e = marks("Calculate 1 + 1.", text)
    assert all(s.status in STEP_STATUSES for s in e.steps)


def test_huge_and_deeply_nested_inputs_are_bounded_by_construction(monkeypatch):
    import nestling.core.explain as ex

    calls = []
    real = ex.check_step
    monkeypatch.setattr(ex, "check_step", lambda s, t=None: calls.append(s) or real(s, t))
    steps = [f"{i} + 1 = {i + 1}" for i in range(10_000)]
    e = ground("Calculate 1 + 1.", steps, "10000")
    assert len(calls) == MAX_CHECKED_STEPS and len(e.steps) == 10_000
    assert e.steps[-1].status == "unchecked" and e.steps[-1].reason == "too many steps to check"
    assert not e.complete and e.reason == "too many steps to check"
    calls.clear()
    nested = "(" * 5_000 + "1 + 1" + ")" * 5_000 + " = 2"
    e = ground("Calculate 1 + 1.", [nested, "(" * 60 + "1 + 1" + ")" * 60 + " = 2"], "2")
    assert len(calls) == 1 and len(e.steps[0].text) == MAX_STEP_CHARS  # the long one is never parsed
    assert [s.status for s in e.steps] == ["unchecked", "grounded"]


def test_the_checker_as_a_classifier_on_a_labelled_set():
    from grounding_set import labelled_set, score

    items = labelled_set(seed=0)
    s = score(items)
    assert s["items"] >= 300 and s["correct_chains"] >= 100 and s["corrupted_chains"] >= 300
    assert s["precision"] >= 0.99 and s["corrupted_called_complete"] <= 0.01
    assert s["recall"] >= 0.95
    for kind in (
        "operand_swapped",
        "operator_changed",
        "result_from_nowhere",
        "answer_differs",
        "false_step",
    ):
        assert s["by_kind"][f"arithmetic/{kind}"]["called_complete"] <= 0.01
    # decomposed chains: grounded when the parts split a stated number and are recombined, else not
    assert s["by_kind"]["place/correct"]["called_complete"] >= 0.95
    for kind in ("wrong_part", "parts_do_not_sum", "part_left_out", "recombination_skips_a_part"):
        assert s["by_kind"][f"place/{kind}"]["called_complete"] == 0.0
    # a word problem's operation is read from its words: a changed operator is caught on the templates the
    # cues were developed on, and is never called complete on the ones written afterwards either (where the
    # words name no operation, the explanation is not complete: its steps cannot be checked against them)
    assert s["blind_spots"] == []
    assert s["by_kind"]["word/operator_changed"]["called_complete"] == 0.0
    assert s["by_kind"]["word_new/operator_changed"]["called_complete"] == 0.0
    assert s["by_kind"]["word/correct"]["called_complete"] == 1.0


def test_a_word_problems_operation_is_read_from_its_words():
    from nestling.core.explain import question_operation

    assert question_operation("Sam has 5 apples and buys 3 more. How many apples now?") == "+"
    assert question_operation("There are 9 birds on a fence. 4 fly away. How many are left?") == "-"
    assert question_operation("4 children share 20 crayons equally. How many does each get?") == "/"
    assert question_operation("Lee saves 5 dollars every week. How much after 6 weeks?") == "*"
    assert question_operation("Sam is 12 and Ana is 7. How many years older is Sam?") == "-"
    assert question_operation("There are 8 red cars and 6 blue cars. How many cars are there?") == "+"
    assert question_operation("What is 7 + 5?") is None  # an expression: judged by its value instead
    assert question_operation("Sam buys 3 packs of 4 and eats 2. How many?") is None  # three numbers
    e = ground("Ana had 7 balloons. 3 balloons popped. How many are left?", ["7 + 3 = 10"], "10")
    assert not e.complete and "words ask for -" in e.steps[0].reason  # "left": the words ask for -
    e = ground("Ana had 7 balloons. 3 balloons popped. How many does she have?", ["7 - 3 = 4"], "4")
    assert e.steps[0].status == "grounded" and not e.complete and "which operation" in e.reason
    e = ground("Calculate 10 - 2.", ["10 - 2 = 8", "Check: 8 + 2 = 10"], "8")
    assert e.complete  # a check recomputes a stated number from the result; the answer stays the result
