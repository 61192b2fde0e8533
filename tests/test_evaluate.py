"""Evaluation: trivial baseline, explanation metrics, teacher cache, files written, the distill pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import nestling.distill.teachers as distill_teachers
import nestling.distill.traces  # noqa: F401  bound to the real load_teacher before any test patches it
import pytest
from fake_run import make_run
from nestling.distill.evaluate import EvalConfig, evaluate
from nestling.distill.scoring import score_outputs
from nestling.distill.tasks import Example, TaskScorer, trivial_baseline
from nestling.distill.teachers import Generation, Teacher

from nestling.core.errors import NestlingError
from nestling.core.rundir import RunDir


class ScriptedTeacher(Teacher):
    """Answers right on sums and wrong on differences, with one checkable step; counts its loads."""

    loads = 0
    params = 134_515_008

    def __init__(self, spec: str, n_threads: int | None = None, **_):
        type(self).loads += 1
        self.spec = spec

    def generate(self, prompts, n, sampling):
        assert sampling.temperature == 0  # the teacher is evaluated greedily
        out = []
        for messages in prompts:
            q = messages[-1]["content"]
            a, op, b = q.removeprefix("What is ").rstrip("?").split()
            value = int(a) + int(b) if op == "+" else int(a) - int(b) + 1
            text = f"Step 1: {a} {op} {b} = {value}\nAnswer: {value}"
            out.append([Generation(text=text, tokens=12, seconds=0.1)] * n)
        return out

    def close(self):
        pass


@pytest.fixture
def scripted_teacher(monkeypatch):
    ScriptedTeacher.loads = 0
    monkeypatch.setattr(distill_teachers, "load_teacher", ScriptedTeacher)
    return ScriptedTeacher


def test_baseline_is_the_most_common_training_answer(tmp_path):
    run = make_run(tmp_path / "run", n=60, heldout=20)
    train, held = RunDir(run).splits()
    base = trivial_baseline([Example.from_row(r) for r in train], [Example.from_row(r) for r in held])
    from collections import Counter

    common = Counter(r["gold"] for r in train).most_common(1)[0][0]
    assert base["answers"] == {"rg:basic_arithmetic": common}
    assert base["accuracy"] == pytest.approx(sum(r["gold"] == common for r in held) / len(held))


def test_explanation_metrics_tell_right_steps_from_lucky_answers():
    rows = [
        {"id": str(i), "task": "rg:basic_arithmetic", "question": "q", "gold": "7", "meta": {}}
        for i in range(4)
    ]
    texts = [
        "\nStep 1: 3 + 4 = 7\nAnswer: 7",  # right, every step right, consistent
        "\nStep 1: 3 + 4 = 8\nAnswer: 7",  # right answer after a false step, inconsistent
        "\nStep 1: 3 + 4 = 8\nAnswer: 8",  # wrong, consistent with its false step
        "\nStep 1: add them\nAnswer: 7",  # right, nothing checkable
    ]
    m = score_outputs(rows, texts, TaskScorer(), explain=True)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["steps_all_right"] == pytest.approx(1 / 4)
    assert m["steps_checkable"] == pytest.approx(3 / 4)
    assert m["consistent"] == pytest.approx(2 / 4)
    assert m["by_task"] == {"rg:basic_arithmetic": 0.75}
    assert m["correct"] == "1101"  # per question, in order: what an export's subset is compared on


def test_complete_explanations_are_grounded_in_the_question():
    row = {"task": "rg:basic_arithmetic", "question": "Calculate 3 + 4.", "gold": "7", "meta": {}}
    texts = [
        "\nStep 1: 3 + 4 = 7\nAnswer: 7",  # complete
        "\nStep 1: 2 + 5 = 7\nAnswer: 7",  # right answer and arithmetic, numbers from nowhere
        "\nStep 1: 3 * 4 = 12\nAnswer: 12",  # the question's numbers, another operation
        "\nStep 1: 3 + 4 = 7\nStep 2: 7 + 0 = 7\nAnswer: 7",  # 0 is not in the question
    ]
    rows = [{**row, "id": str(i)} for i in range(len(texts))]
    m = score_outputs(rows, texts, TaskScorer(), explain=True)
    assert m["steps_all_right"] == 1.0 and m["consistent"] == 1.0
    assert m["complete"] == pytest.approx(1 / 4) and m["ungrounded"] == pytest.approx(3 / 4)


def test_eval_writes_files_caches_the_teacher_and_skips_unchanged_students(
    tmp_path, scripted_teacher, monkeypatch
):
    from conftest import build_tiny_student

    run = make_run(tmp_path / "run", n=60, heldout=12)
    build_tiny_student(run / "students" / "tiny" / "model", steps=20)
    cfg = EvalConfig(run=str(run), teacher="gguf:fake", threads=1, progress=False, max_new_tokens=24)
    result = evaluate(cfg)

    _, held = RunDir(run).splits()
    sums = sum("+" in r["question"] for r in held) / len(held)
    assert result["teacher"]["accuracy"] == pytest.approx(sums)  # the scripted teacher is right on sums only
    assert result["teacher"]["params"] == ScriptedTeacher.params
    s = result["students"]["tiny"]
    for mode in ("answer", "explain"):
        assert 0.0 <= s[mode]["accuracy"] <= 1.0 and s[mode]["n"] == len(held)
        assert s[mode]["mean_new_tokens"] > 0
    assert s["params"] > 0 and s["latency_s"] > 0 and s["tokens_per_s"] > 0
    assert "steps_all_right" in s["explain"] and "consistent" in s["explain"] and "complete" in s["explain"]

    saved = json.loads((run / "students/tiny/eval.json").read_text())
    assert saved["stage"] == "eval" and saved["result"]["accuracy"] == s["accuracy"]
    table = (run / "eval.md").read_text()
    assert "teacher gguf:fake" in table and "trivial baseline" in table and "student tiny" in table

    mtime = (run / "students/tiny/eval.json").stat().st_mtime_ns
    again = evaluate(cfg)
    assert ScriptedTeacher.loads == 1  # the teacher's answers came from RUN/teacher_eval.json
    assert (run / "students/tiny/eval.json").stat().st_mtime_ns == mtime
    assert again["students"]["tiny"] == json.loads(json.dumps(s))

    import nestling.distill.prompts as distill_prompts

    # An edited template is not the cached one, even with the same fewshot flag.
    monkeypatch.setattr(distill_prompts, "SYSTEM", distill_prompts.SYSTEM + " Be brief.")
    evaluate(cfg)
    assert ScriptedTeacher.loads == 2


def test_eval_without_students_or_heldout_says_what_to_do(tmp_path):
    run = make_run(tmp_path / "run", n=30, heldout=10)
    with pytest.raises(NestlingError, match="no trained students"):
        evaluate(EvalConfig(run=str(run), teacher="none", progress=False))
    run2 = make_run(tmp_path / "run2", n=30, heldout=0)
    with pytest.raises(NestlingError, match="held-out"):
        evaluate(EvalConfig(run=str(run2), teacher="none", progress=False))


def test_distill_trains_each_student_evaluates_and_resumes(tmp_path, scripted_teacher, monkeypatch):
    import nestling.distill.pipeline as pipeline

    calls = []

    def fake_traces(cfg):  # the trace store is another stage's job; write its output directly
        calls.append(cfg.out)
        if not (Path(cfg.out) / "traces").exists():
            make_run(Path(cfg.out), n=80, heldout=10)
        return Path(cfg.out) / "traces"

    monkeypatch.setattr(pipeline, "_traces", fake_traces)
    monkeypatch.setattr("nestling.distill.teachers.check_teacher_spec", lambda spec: None)  # gguf:fake
    cfg = pipeline.DistillConfig(
        out=str(tmp_path / "run"), teacher="gguf:fake", students=["nano,b=nano?seed=1"], steps=8, threads=1
    )
    assert cfg.students == ["nano", "b=nano?seed=1"]
    result = pipeline.run_distill(cfg)
    assert set(result["students"]) == {"nano", "b"}
    for name, model_dir in result["students"].items():
        assert (model_dir / "model.safetensors").is_file()
        assert f"student {name}" in result["table"]
    assert "teacher gguf:fake" in result["table"] and "trivial baseline" in result["table"]

    manifest = tmp_path / "run/students/nano/manifest.json"
    mtime = manifest.stat().st_mtime_ns
    pipeline.run_distill(cfg)  # everything fresh: nothing retrained, the teacher not reloaded
    assert manifest.stat().st_mtime_ns == mtime and ScriptedTeacher.loads == 1 and len(calls) == 2


def test_distill_rejects_duplicate_student_names():
    from nestling.distill.pipeline import DistillConfig

    with pytest.raises(NestlingError, match="duplicate"):
        DistillConfig(students=["tiny", "tiny"])


def test_wilson_interval_matches_the_textbook_values():
    from nestling.distill.stats import wilson

    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    lo, hi = wilson(30, 40)
    assert lo < 0.75 < hi and hi - lo < wilson(3, 4)[1] - wilson(3, 4)[0]  # more questions, narrower


def test_a_task_without_gold_runs_end_to_end_and_every_table_says_what_it_was_scored_against(tmp_path):
    """traces (a stand-in server, answers by vote) -> a nano student -> eval against the teacher's vote."""
    from nestling.distill.traces import TracesConfig, run_traces
    from nestling.distill.train import TrainConfig, train
    from teacher_fakes import StandIn

    data = tmp_path / "questions.jsonl"
    pairs = [(a, b) for a in range(2, 9) for b in range(1, 6)]
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?"}) + "\n" for a, b in pairs))
    run = tmp_path / "run"
    with StandIn("reasoning_content") as srv:
        spec = f"openai:m@{srv.url}"
        out = run_traces(
            TracesConfig(task=f"file:{data}", teacher=spec, n=30, heldout=6, samples=2, out=str(run)),
            progress=False,
        )
        card = json.loads((out / "datacard.json").read_text())
        assert card["kept"] == 24 and card["vote"]["labelled"] == 24 and card["sample_accuracy"] is None
        train(TrainConfig(run=str(run), student="nano", steps=6, batch_size=8, threads=1, progress=False))
        result = evaluate(
            EvalConfig(run=str(run), teacher=spec, threads=1, progress=False, max_new_tokens=16)
        )
    ref = result["reference"]
    assert ref["kind"] == "teacher-vote" and ref["labelled"] == ref["heldout"] == 6 and ref["samples"] == 3
    assert result["teacher"]["accuracy"] == 1.0  # the stand-in always agrees with its own vote
    assert result["teacher"]["accuracy_ci"][0] < 1.0  # 6 questions: a wide interval, and it says so
    assert result["students"]["nano"]["accuracy_ci"][0] <= result["students"]["nano"]["accuracy"]
    for md in (run / "eval.md", run / "students" / "nano" / "eval.md"):
        assert "No gold answers: scored against the teacher's self-consistency vote" in md.read_text()
    assert json.loads((run / "eval.json").read_text())["reference"]["kind"] == "teacher-vote"
    assert "[" in result["table"].splitlines()[-1]  # the student's accuracy carries its interval
