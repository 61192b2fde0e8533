"""The calculator in the decoding loop: core.calculator finds and corrects a false result on a line; the
runtime, the HTTP API and `nestling ask` go on from the corrected text and say what was replaced."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from nestling.serve.runtime import MAX_CORRECTIONS, Reasoner
from serve_fakes import make_fake_export, register_fake

from nestling.core.calculator import first_slip, format_value
from nestling.core.explain import answers_match, parse_steps


@pytest.mark.parametrize(
    "line, fixed, stated",
    [
        ("Step 1: 9 * 8 = 64", "Step 1: 9 * 8 = 72", "64"),
        ("Step 1: 9 * 8 = 64, so 64 + 3 = 67", "Step 1: 9 * 8 = 72", "64"),
        ("Step 2: 72 + 3 = 75, then 75 - 5 = 71.", "Step 2: 72 + 3 = 75, then 75 - 5 = 70", "71"),
        ("Step 1: 2 + 3 * 4 = 2 + 13 = 15", "Step 1: 2 + 3 * 4 = 14", "2 + 13"),
        ("Step 1: 2 + 3 * 4 = 2 + 12 = 15", "Step 1: 2 + 3 * 4 = 2 + 12 = 14", "15"),
        ("Step 1: 3 x 4 = 11", "Step 1: 3 x 4 = 12", "11"),
        ("Step 1: 3 \u00d7 4 = 11 apples", "Step 1: 3 \u00d7 4 = 12", "11"),
        ("Step 1: 3 - 5 = 2", "Step 1: 3 - 5 = -2", "2"),
        ("Step 1: 7 / 2 = 3", "Step 1: 7 / 2 = 3.5", "3"),
        ("Step 1: (2 + 3) * 4 = 24", "Step 1: (2 + 3) * 4 = 20", "24"),
        ("Step 1 4 - 1 = 2", "Step 1 4 - 1 = 3", "2"),
        ("Step 1: 9*8=64", "Step 1: 9*8=72", "64"),
    ],
)
def test_a_false_result_is_cut_and_corrected(line: str, fixed: str, stated: str) -> None:
    slip = first_slip(line)
    assert slip is not None
    assert slip.text == fixed
    assert slip.stated == stated
    assert fixed.endswith(slip.value)
    assert slip.stated_in(fixed.split(":", 1)[-1])  # the step the runtime marks: spacing and signs aside


@pytest.mark.parametrize(
    "line",
    [
        "Step 1: 9 * 8 = 72",
        "Step 1: 2 + 3 * 4 = 2 + 12 = 14",
        "Step 1: 10 / 3 = 3.33",  # rounded to the digits it states, as the step checker reads it
        "Answer: 9 * 8 = 64",  # the answer line states the answer, not a calculation to correct
        "Step 1: nine times eight is 64",  # words: the step checker marks it, the calculator leaves it
        "Step 1: Let x = 5",
        "Step 1: 12 = 12",
        "Step 1: What is 3 + 4 = ?",
        "Step 1: 7 + 3 = 10 7",  # a whole token: "10 7" is not read as a number, "10" holds
        "",
    ],
)
def test_a_line_that_holds_or_states_nothing_symbolic_is_left_alone(line: str) -> None:
    assert first_slip(line) is None


def test_a_corrected_line_is_read_as_true_by_the_calculator_and_the_step_checker() -> None:
    from nestling.core.explain import check_step

    for line in ["Step 1: 7 / 3 = 2", "Step 1: 1 / 8 = 0.2", "Step 1: 2 ^ 10 = 1000"]:
        slip = first_slip(line)
        assert slip is not None
        assert first_slip(slip.text) is None
        assert check_step(parse_steps(slip.text)[0]).ok is True
    assert format_value(__import__("fractions").Fraction(7, 3)) == "2.333333"


def test_a_long_line_is_bounded_in_time() -> None:
    line = "Step 1: " + " + ".join(["1"] * 5000) + " = 3"
    t0 = time.perf_counter()
    assert first_slip(line) is None  # past MAX_LINE: left as written
    assert first_slip("1 + 1 = 3 " * 39) is not None
    assert time.perf_counter() - t0 < 1.0


@pytest.fixture()
def reasoner(tmp_path):
    loaded = register_fake()
    with Reasoner.load(make_fake_export(tmp_path)) as r:
        yield r, loaded


def test_the_runtime_goes_on_from_the_corrected_result(reasoner) -> None:
    r, loaded = reasoner
    plain = r.ask("slip: what is 9 * 8 + 3?")
    assert plain.answer == "67"
    assert [s.status for s in plain.steps] == ["false", "grounded"]
    assert plain.complete is False and plain.corrections == 0

    calls = loaded[0].calls
    a = r.ask("slip: what is 9 * 8 + 3?", calculator=True)
    assert loaded[0].calls - calls == 2  # one restart, from "...9 * 8 = 72"
    assert a.text == "\nStep 1: 9 * 8 = 72\nStep 2: 72 + 3 = 75\nAnswer: 75"
    assert a.answer == "75"
    assert a.corrections == 1
    assert [s.corrected_from for s in a.steps] == ["64", None]
    assert [s.status for s in a.steps] == ["grounded", "grounded"]
    assert a.complete is True and a.verified is True
    # every generated token counts, the discarded tail of the first try included
    assert a.latency.completion_tokens == len("\nStep 1: 9 * 8 = 64\n") + len(
        "\nStep 2: 72 + 3 = 75\nAnswer: 75"
    )


def test_a_right_explanation_is_one_generation_and_unchanged(reasoner) -> None:
    r, loaded = reasoner
    calls = loaded[0].calls
    a = r.ask("What is 7 + 5?", calculator=True)
    assert loaded[0].calls - calls == 1
    assert (a.answer, a.corrections, a.complete) == ("12", 0, True)
    assert a.text == r.ask("What is 7 + 5?").text


def test_the_token_budget_covers_every_piece(reasoner) -> None:
    r, _ = reasoner
    a = r.ask("ramble on", calculator=True, max_tokens=40)
    assert a.finish_reason == "length" and a.stopped_by == "max_tokens"
    assert a.latency.completion_tokens == 40
    b = r.ask("slip: what is 9 * 8 + 3?", calculator=True, max_tokens=25)
    assert b.latency.completion_tokens <= 25
    assert b.finish_reason == "length"


def test_answer_mode_and_verify_compose_with_the_calculator(reasoner) -> None:
    r, _ = reasoner
    a = r.ask("slip: what is 9 * 8 + 3?", explain=False, calculator=True)
    assert a.answer == "72" and a.corrections == 0  # answer-only: nothing to correct
    v = r.ask("lucky: 3 + 4?", calculator=True, verify=8)
    assert v.complete is True and v.tries > 1  # the calculator cannot ground "2 + 5"; resampling does
    assert MAX_CORRECTIONS >= 1


def test_http_and_cli_expose_the_corrections(tmp_path, capsys) -> None:
    from nestling.serve.app import create_app
    from nestling.serve.cli import AskConfig, ask_main
    from nestling.serve.settings import Settings

    register_fake()
    export = make_fake_export(tmp_path)
    with TestClient(create_app(Settings(), reasoner=Reasoner.load(export))) as c:
        body = c.post("/v1/answer", json={"question": "slip: 9 * 8 + 3?", "calculator": True}).json()
        assert body["answer"] == "75" and body["corrections"] == 1
        assert body["steps"][0]["corrected_from"] == "64"
        off = c.post("/v1/answer", json={"question": "slip: 9 * 8 + 3?"}).json()
        assert off["answer"] == "67" and off["corrections"] == 0
        assert c.post("/v1/answer", json={"question": "q 1 + 1", "calculator": "yes"}).status_code == 422
        chat = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "slip: 9 * 8 + 3?"}], "calculator": True},
        ).json()
        assert chat["nestling"]["corrections"] == 1 and chat["nestling"]["answer"] == "75"
    assert ask_main(AskConfig(dir=str(export), question="slip: 9 * 8 + 3?", calculator=True)) == 0
    out = capsys.readouterr().out
    assert "9 * 8 = 72  (calculator: the model wrote 64)" in out
    assert "Answer: 75" in out


@pytest.fixture(scope="module")
def slipping_export(tmp_path_factory) -> Path:
    """A tiny student trained long enough to write the step format and still get many results wrong."""
    from conftest import arithmetic_rows, build_tiny_student
    from nestling.export.pipeline import ExportConfig, export_student

    root = tmp_path_factory.mktemp("slipping")
    build_tiny_student(root / "student", steps=800, seed=1, lr=2e-3)
    cfg = ExportConfig(
        student=str(root / "student"),
        out=str(root / "export"),
        threads=1,
        f16_logit_tol=2.0,
        variants=["gguf-f16"],
    )
    export_student(cfg, prompts=arithmetic_rows(12, 123))
    return root / "export"


@pytest.mark.slow
def test_a_real_export_with_the_calculator_states_no_false_result(slipping_export) -> None:
    """With the calculator no finished line keeps a false result, and an answer greedy wrote without a slip
    is unchanged."""
    from conftest import arithmetic_rows

    rows = arithmetic_rows(40, seed=7)
    with Reasoner.load(slipping_export, engine="gguf") as r:
        plain = [r.ask(q, max_tokens=48) for q, _ in rows]
        fixed = [r.ask(q, max_tokens=48, calculator=True) for q, _ in rows]
    assert sum(a.corrections for a in fixed) > 0
    for p, a in zip(plain, fixed, strict=True):
        assert all(first_slip(line) is None for line in _finished_lines(a)), a.text
        if not any(first_slip(line) for line in _finished_lines(p)):
            assert a.text == p.text and a.corrections == 0
        assert sum(s.corrected_from is not None for s in a.steps) <= a.corrections
    right = sum(answers_match(a.answer, g) for a, (_, g) in zip(fixed, rows, strict=True))
    assert right >= sum(answers_match(a.answer, g) for a, (_, g) in zip(plain, rows, strict=True))


def _finished_lines(a) -> list[str]:
    lines = a.text.split("\n")
    return lines if a.finish_reason == "stop" else lines[:-1]


def test_gguf_resume_reads_only_the_new_tail_and_decodes_as_a_fresh_stream(
    tiny_export_dir, tiny_prompts
) -> None:
    from nestling.serve.engines import load_engine

    from nestling.core.prompting import student_prompt

    eng = load_engine(tiny_export_dir / "gguf" / "model-f16.gguf", kind="gguf", n_threads=1)
    try:
        fed: list[int] = []
        real_eval = eng._llm.eval
        eng._llm.eval = lambda toks: (fed.append(len(toks)), real_eval(toks))[1]
        tail = eng.tokenize(" Step 1: 2 + 2 =")[1:]
        for q, _ in tiny_prompts[:4]:
            head = eng.tokenize(student_prompt(q))
            full = head + tail
            fresh = list(eng.stream(full, 12))
            list(eng.stream(head, 12))  # the cache now holds the prompt and what greedy wrote after it
            fed.clear()
            assert list(eng.resume(full, 12)) == fresh
            assert fed[0] <= len(tail)  # the prompt was kept; at most the new tail is read
            fed.clear()
            assert list(eng.resume(full, 12)) == fresh
            assert fed[0] == 1  # all of it was kept: only the last token is read again, for its logits
    finally:
        eng.close()
