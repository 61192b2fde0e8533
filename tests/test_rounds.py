"""Rounds (distill.rounds) on a fake run with a tiny preset student: round 2 adds verified student rows with
their source and never a held-out question, every round retrains from the base, a killed run continues
where it stopped, a dev split that stops improving ends the rounds, and bad values are one-line errors.

The student's sampling is scripted (a student trained for a few steps solves nothing): each sampled
question gets one right and one wrong rationale, so the filters have something to keep and to drop."""

from __future__ import annotations

import json
from pathlib import Path

import nestling.distill.pipeline as pipeline
import nestling.distill.rounds as rounds
import nestling.distill.train as train_mod
import pytest
from fake_run import make_run
from nestling.distill.pipeline import DistillConfig

from nestling.core.errors import NestlingError
from nestling.core.manifest import read_jsonl

UNCOVERED = 12  # training questions the fake teacher left without a verified row


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A run whose traces are written directly, a scripted teacher for eval, spies on sampling and train."""
    from test_evaluate import ScriptedTeacher

    calls: dict[str, list] = {"sampled": [], "train": [], "fit": 0}

    def traces(cfg):
        run = make_run(Path(cfg.out), n=60, heldout=20)
        kept = run / "traces" / "kept.jsonl"
        kept.write_text("".join(line + "\n" for line in kept.read_text().splitlines()[UNCOVERED:]))
        return run / "traces"

    def scripted(model_dir, examples, rcfg, r, hint=False):
        calls["sampled"].append((r, [ex.question for ex in examples]))
        records = []
        for ex in examples:
            expr = ex.meta.get("expression") or ex.question.removeprefix("What is ").rstrip("?")
            for j, (value, ok) in enumerate([(ex.gold, True), (f"{ex.gold}1", False)]):
                text = f"Step 1: {expr} = {value}\nAnswer: {value}"
                records.append({"id": f"{ex.id}:{j}", "qid": ex.id, "task": ex.task, "rationale": text,
                                "answer": value, "correct": ok, "truncated": False})  # fmt: skip
        return records

    real_train, real_fit = train_mod.train, train_mod.fit

    def spy_train(cfg, rows=None, out=None):
        calls["train"].append((cfg.student, Path(out), None if rows is None else list(rows)))
        return real_train(cfg, rows=rows, out=out)

    def spy_fit(job):
        calls["fit"] += 1
        return real_fit(job)

    monkeypatch.setattr(pipeline, "_traces", traces)
    monkeypatch.setattr(rounds, "sample_records", scripted)
    monkeypatch.setattr(train_mod, "train", spy_train)
    monkeypatch.setattr(train_mod, "fit", spy_fit)
    monkeypatch.setattr("nestling.distill.teachers.load_teacher", ScriptedTeacher)
    monkeypatch.setattr("nestling.distill.teachers.check_teacher_spec", lambda spec: None)
    return calls


def config(tmp_path: Path, **kw) -> DistillConfig:
    base = dict(out=str(tmp_path / "run"), teacher="gguf:fake", students=["nano"], steps=3, threads=1,
                eval_limit=4, round_fresh=6, round_dev=5)  # fmt: skip
    return DistillConfig(**{**base, **kw})


def test_round_two_adds_verified_student_rows_and_never_a_heldout_question(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(
        rounds, "dev_score", lambda ctx, student, dev: {"accuracy": 0.1 * int(student.parent.name[1:])}
    )
    pipeline.run_distill(config(tmp_path, rounds=2))
    run = tmp_path / "run"
    questions = read_jsonl(run / "traces" / "questions.jsonl")
    held = {q["question"] for q in questions if q["split"] == "heldout"}
    (r, asked), *_ = fake["sampled"]
    assert r == 2 and asked and not set(asked) & held
    uncovered = [q["question"] for q in questions if q["split"] == "train"][:UNCOVERED]
    assert asked[:UNCOVERED] == uncovered and len(asked) == UNCOVERED + 6  # + the fresh ones

    rows = read_jsonl(run / "rounds" / "nano" / "r2" / "rows.jsonl")
    assert {row["source"] for row in rows} == {"student:nano:round2"}
    assert not {row["question"] for row in rows} & held
    m = json.loads((run / "rounds" / "nano" / "r2" / "manifest.json").read_text())
    assert m["stage"] == "round"
    assert (m["metrics"]["train_tried"], m["metrics"]["train_solved"]) == (UNCOVERED, UNCOVERED)
    # Each question's wrong rationale is dropped; the right one is kept unless the grounding check refuses
    # its one-step form (reasoning-gym's "-( 8 + 8 / 2 )" is), as it would refuse the teacher's.
    assert m["metrics"]["fresh_tried"] == 6 and 1 <= m["metrics"]["fresh_kept"] <= 6
    assert len(rows) == UNCOVERED + m["metrics"]["fresh_kept"]
    assert m["metrics"]["samples"] == 2 * len(asked) and m["metrics"]["rows_kept"] == len(rows)

    # Round 2 trained on the teacher's rows plus the student's, from the base spec, in its own directory.
    (spec1, out1, rows1), (spec2, out2, rows2) = fake["train"]
    assert spec1 == spec2 == "nano" and rows1 is None
    assert out1 == run / "rounds/nano/r1/student" and out2 == run / "rounds/nano/r2/student"
    teacher_rows = read_jsonl(run / "traces" / "kept.jsonl")
    assert rows2 == teacher_rows + rows
    summary = json.loads((run / "rounds" / "nano" / "manifest.json").read_text())["metrics"]
    assert summary["best_round"] == 2 and [h["round"] for h in summary["rounds"]] == [1, 2]
    for h in summary["rounds"]:  # each round's student on the held-out split, both modes, with intervals
        assert {"explain", "answer"} <= set(h["heldout"]) and h["heldout"]["explain"]["n"] == 4
    published = json.loads((run / "students" / "nano" / "manifest.json").read_text())
    assert published["round"] == 2
    r2 = json.loads((run / "rounds/nano/r2/student/manifest.json").read_text())
    assert published["files"] == r2["files"]  # RUN/students/nano is the best round's student

    from nestling.report import collect_report, write_report

    report = write_report(run, collect_report(run), 0.02)
    entries = report["rounds"]["nano"]["rounds"]
    assert [e["round"] for e in entries] == [1, 2] and report["rounds"]["nano"]["best_round"] == 2
    assert all(e["accuracy_ci"] and e["accuracy_answer_only_ci"] and e["n"] == 4 for e in entries)
    assert entries[1]["rows_added"] == len(rows) and entries[1]["train_solved"] == UNCOVERED
    md = (run / "report.md").read_text()
    assert "## Rounds" in md and "| 2 (best) |" in md and "training questions" in md
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_every_round_starts_from_the_base_weights(tmp_path, fake, monkeypatch):
    """A retrain that continued from round 1 would start at round 1's low loss; from the base it starts
    where round 1 started."""
    monkeypatch.setattr(
        rounds, "dev_score", lambda ctx, student, dev: {"accuracy": 0.1 * int(student.parent.name[1:])}
    )
    pipeline.run_distill(
        config(tmp_path, rounds=2, steps=40, students=["hf-tiny=" + _tiny_hf(tmp_path)], lr=3e-3)
    )
    run = tmp_path / "run" / "rounds" / "hf-tiny"
    m1, m2 = (json.loads((run / f"r{r}/student/manifest.json").read_text())["metrics"] for r in (1, 2))
    assert m1["final_loss"] < 0.7 * m1["initial_loss"]  # round 1 learnt something
    assert abs(m2["initial_loss"] - m1["initial_loss"]) < 0.25 * m1["initial_loss"]
    assert m2["initial_loss"] > 0.8 * m1["initial_loss"]


def _tiny_hf(tmp_path: Path) -> str:
    """A small random pretrained-style student (hf:DIR): its init is the same weights every time."""
    from nestling.distill.students import StudentPreset, new_student, save_student, train_tokenizer

    d = tmp_path / "base"
    if not d.is_dir():
        tok = train_tokenizer(
            [f"Step 1: {a} + {b} = {a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)], 300
        )
        save_student(new_student(StudentPreset(64, 128, 2, 4, 2, vocab_size=len(tok)), tok), tok, d)
    return f"hf:{d}"


def test_a_killed_run_continues_without_redoing_finished_rounds(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(
        rounds, "dev_score", lambda ctx, student, dev: {"accuracy": 0.1 * int(student.parent.name[1:])}
    )
    scripted = rounds.sample_records

    def killed_in_round_3(model_dir, examples, rcfg, r, hint=False):
        if r == 3:
            raise KeyboardInterrupt  # the process dies while round 3 samples
        return scripted(model_dir, examples, rcfg, r)

    monkeypatch.setattr(rounds, "sample_records", killed_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_distill(config(tmp_path, rounds=3))
    run = tmp_path / "run" / "rounds" / "nano"
    done = {p: p.read_text() for p in run.glob("r[12]/**/manifest.json")}
    assert len(done) == 3 and fake["fit"] == 2  # r1 and r2 students, r2 samples
    fake["sampled"].clear()

    monkeypatch.setattr(rounds, "sample_records", scripted)
    pipeline.run_distill(config(tmp_path, rounds=3))
    assert [r for r, _ in fake["sampled"]] == [3]  # round 2 was not sampled again
    assert fake["fit"] == 3  # only round 3 trained
    assert {p: p.read_text() for p in done} == done
    summary = json.loads((run / "manifest.json").read_text())["metrics"]
    assert summary["best_round"] == 3 and summary["stopped_by"] == "rounds"

    import shutil

    shutil.rmtree(tmp_path / "run" / "students" / "nano" / "model")  # killed while publishing
    pipeline.run_distill(config(tmp_path, rounds=3))
    assert (tmp_path / "run" / "students" / "nano" / "model" / "config.json").is_file() and fake["fit"] == 3


def test_rounds_stop_when_dev_does_not_improve_and_keep_the_best(tmp_path, fake, monkeypatch):
    dev = {1: 0.2, 2: 0.4, 3: 0.4, 4: 0.9}
    monkeypatch.setattr(
        rounds, "dev_score", lambda ctx, student, q: {"accuracy": dev[int(student.parent.name[1:])]}
    )
    pipeline.run_distill(config(tmp_path, rounds=4))
    run = tmp_path / "run"
    summary = json.loads((run / "rounds" / "nano" / "manifest.json").read_text())["metrics"]
    assert [h["round"] for h in summary["rounds"]] == [1, 2, 3]  # round 4 never ran
    assert summary["stopped_by"] == "dev did not improve" and summary["best_round"] == 2
    assert json.loads((run / "students" / "nano" / "manifest.json").read_text())["round"] == 2
    assert not (run / "rounds" / "nano" / "r4").exists()


def test_the_dev_questions_are_fresh_and_real_scoring_runs(tmp_path, fake):
    pipeline.run_distill(config(tmp_path, rounds=2))
    run = tmp_path / "run"
    questions = {q["question"] for q in read_jsonl(run / "traces" / "questions.jsonl")}
    dev = json.loads((run / "rounds/nano/r1/dev.json").read_text())
    assert dev["stage"] == "round-dev" and dev["result"]["n"] == 5
    sampled = {q for _, asked in fake["sampled"] for q in asked}
    ctx_dev = rounds.dev_questions(
        rounds._Ctx(run, "nano", None, rounds.rounds_config(config(tmp_path, rounds=2)),
                    read_jsonl(run / "traces" / "questions.jsonl"), "rg:basic_arithmetic", None, None)
    )  # fmt: skip
    assert not {ex.question for ex in ctx_dev} & (questions | sampled)


def test_rationalization_retries_unsolved_questions_with_the_gold_as_a_hint(tmp_path, fake, monkeypatch):
    """Off by default; on, the questions a round left unsolved are sampled again with the hint in the prompt,
    and the kept rows hold the question without it."""
    scripted, prompts = rounds.sample_records, []

    def hint_only(model_dir, examples, rcfg, r, hint=False):
        prompts.append(hint)
        records = scripted(model_dir, examples, rcfg, r)
        fresh = {ex.id for ex in examples if ex.id.startswith(f"r{r}f")}
        return [x for x in records if hint or x["qid"] not in fresh]  # fresh ones only solved with the hint

    monkeypatch.setattr(rounds, "sample_records", hint_only)
    monkeypatch.setattr(
        rounds, "dev_score", lambda ctx, student, dev: {"accuracy": 0.1 * int(student.parent.name[1:])}
    )
    pipeline.run_distill(config(tmp_path, rounds=2, round_rationalize=True))
    assert prompts == [False, True]
    run = tmp_path / "run" / "rounds" / "nano" / "r2"
    rows = read_jsonl(run / "rows.jsonl")
    hinted = [row for row in rows if row["source"] == "student:nano:round2:rationalized"]
    m = json.loads((run / "manifest.json").read_text())["metrics"]
    assert m["rationalized"]["tried"] == 6 and m["rationalized"]["rows_kept"] == len(hinted) >= 1
    assert all("answer is" not in row["question"] for row in rows)
    assert m["fresh_kept"] == 0 and m["train_solved"] == UNCOVERED


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"rounds": 0}, "--rounds 0: must be >= 1"),
        ({"rounds": 2, "round_samples": 0}, "--round-samples 0: must be >= 1"),
        ({"rounds": 2, "round_dev": -1}, "--round-dev -1: must be >= 0"),
        ({"rounds": 2, "round_temperature": 0.0}, "--round-temperature 0.0: must be > 0"),
    ],
)
def test_bad_values_are_one_line_errors(kw, message):
    with pytest.raises(NestlingError, match=message) as e:
        DistillConfig(students=["nano"], **kw)
    assert "\n" not in str(e.value)


def test_rounds_under_a_launcher_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NestlingError, match="rounds run in one process"):
        DistillConfig(students=["nano"], rounds=2)
    DistillConfig(students=["nano"])


def test_cli_flags_reach_distill_and_run():
    from nestling.run import RunConfig, _overrides

    cfg = RunConfig(
        students=["tiny"], rounds=3, round_samples=2, round_fresh=7, round_dev=0, round_calculator=True,
        compress=["none"],
    )  # fmt: skip
    dcfg = DistillConfig(out=cfg.out, **_overrides(cfg, DistillConfig))
    r = rounds.rounds_config(dcfg)
    assert (r.rounds, r.samples, r.fresh, r.dev, r.calculator) == (3, 2, 7, 0, True)
    assert "calculator" in r.sampling() and "calculator" not in rounds.RoundsConfig().sampling()


def test_students_sample_as_the_teacher_wrote_unless_told():
    from nestling.run import RunConfig, _overrides

    def calc(cls, **kw) -> bool:
        cfg = cls(students=["tiny"], rounds=2, **kw)
        if cls is RunConfig:
            cfg = DistillConfig(out=cfg.out, **_overrides(cfg, DistillConfig))
        return rounds.rounds_config(cfg).calculator

    assert calc(RunConfig) is True  # run: the bundled gguf teacher writes with the calculator
    assert calc(RunConfig, teacher_calculator=False) is False
    assert calc(RunConfig, round_calculator=False) is False
    assert calc(DistillConfig) is False  # distill: the teacher's calculator is off unless asked
    assert calc(DistillConfig, teacher_calculator=True) is True


class _CharTok:
    """Token i is chr(i); 0 is eos."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def _chars(text: str, eos: bool = True) -> list[int]:
    return [ord(c) for c in text] + ([0] if eos else [])


def test_calculator_sampling_corrects_a_slip_and_samples_on_from_the_true_value(monkeypatch):
    """A row whose line states a false result is cut after it, the true value written, and sampled again from
    there (new noise); a row without a slip is sampled once; the budget counts the discarded tail."""
    calls = []

    def scripted(model, tok, texts, seeds, max_new, temperature):
        calls.append((list(texts), list(seeds), list(max_new)))
        out = []
        for t in texts:
            if t.endswith("= 72"):
                out.append(_chars("\nStep 2: 72 + 3 = 75\nAnswer: 75"))
            elif t.startswith("slip"):
                out.append(_chars("Step 1: 9 * 8 = 64\nStep 2: 64 + 3 = 67\nAnswer: 67"))
            else:
                out.append(_chars("Step 1: 2 + 2 = 4\nAnswer: 4"))
        return out

    monkeypatch.setattr(rounds, "_sample_texts", scripted)
    rows = rounds.sample_calculated(None, _CharTok(), ["slip:", "fine:"], [5, 6], 128, 0.7)
    assert rows[0].text == "Step 1: 9 * 8 = 72\nStep 2: 72 + 3 = 75\nAnswer: 75"
    assert (rows[0].corrections, rows[0].truncated) == (1, False)
    assert rows[1].text == "Step 1: 2 + 2 = 4\nAnswer: 4" and rows[1].corrections == 0
    assert [c[0] for c in calls] == [["slip:", "fine:"], ["slip:Step 1: 9 * 8 = 72"]]
    assert calls[1][1] != [5] and calls[1][2] == [
        128 - len(_chars("Step 1: 9 * 8 = 64\nStep 2: 64 + 3 = 67\nAnswer: 67"))
    ]
    # a budget spent by the first piece: the corrected text is kept, cut, and marked truncated
    calls.clear()
    rows = rounds.sample_calculated(None, _CharTok(), ["slip:"], [5], 40, 0.7)
    assert rows[0].text == "Step 1: 9 * 8 = 72" and rows[0].truncated and len(calls) == 1


def test_a_calculator_round_tags_its_rows_and_counts_the_corrections(tmp_path, fake, monkeypatch):
    scripted, seen = rounds.sample_records, []

    def corrected(model_dir, examples, rcfg, r, hint=False):
        seen.append(rcfg.calculator)
        return [
            {**x, "corrections": 1 if x["correct"] else 0} for x in scripted(model_dir, examples, rcfg, r)
        ]

    monkeypatch.setattr(rounds, "sample_records", corrected)
    monkeypatch.setattr(
        rounds, "dev_score", lambda ctx, student, dev: {"accuracy": 0.1 * int(student.parent.name[1:])}
    )
    pipeline.run_distill(config(tmp_path, rounds=2, round_calculator=True))
    run = tmp_path / "run" / "rounds" / "nano" / "r2"
    rows = read_jsonl(run / "rows.jsonl")
    m = json.loads((run / "manifest.json").read_text())
    assert seen == [True] and rows and all(r["source"] == "student:nano:round2:calculator" for r in rows)
    assert m["config"]["calculator"] is True
    calc = m["metrics"]["calculator"]
    assert calc["rationales_corrected"] == calc["corrections"] == calc["right_answer_corrected"] > 0


def test_question_seeds_depend_on_the_question_round_and_sample_only():
    s = rounds.question_seed
    assert s(0, 2, "What is 1 + 2?", 0) == s(0, 2, "what is  1 + 2?", 0)
    assert len({s(0, 2, "q", 0), s(0, 3, "q", 0), s(0, 2, "q", 1), s(1, 2, "q", 0), s(0, 2, "p", 0)}) == 5


def test_a_real_student_samples_verifiable_records(tiny_student_dir):
    """The unscripted sampler on a tiny trained student: one record per (question, sample), seeded."""
    from nestling.distill.tasks import Example

    examples = [Example(f"q{i}", "rg:basic_arithmetic", f"What is {i} + 1?", str(i + 1)) for i in range(3)]
    rcfg = rounds.RoundsConfig(rounds=2, samples=2)
    a = rounds.sample_records(tiny_student_dir, examples, rcfg, 2)
    b = rounds.sample_records(tiny_student_dir, examples, rcfg, 2)
    assert [r["id"] for r in a] == [f"q{i}:{j}" for i in range(3) for j in range(2)]
    assert [r["rationale"] for r in a] == [r["rationale"] for r in b]
    assert all(r["correct"] == (r["answer"] is not None and r["answer"] == ex.gold)
               for r, ex in zip(a, [e for e in examples for _ in range(2)], strict=True))  # fmt: skip


def test_a_real_student_samples_with_the_calculator(tiny_student_dir):
    """The calculator path on a real model and tokenizer: seeded, every record counts its corrections, and
    no kept line states a false result."""
    from nestling.distill.tasks import Example

    from nestling.core.calculator import first_slip

    examples = [Example(f"q{i}", "rg:basic_arithmetic", f"What is {i} + 1?", str(i + 1)) for i in range(3)]
    rcfg = rounds.RoundsConfig(rounds=2, samples=2, calculator=True)
    a = rounds.sample_records(tiny_student_dir, examples, rcfg, 2)
    b = rounds.sample_records(tiny_student_dir, examples, rcfg, 2)
    assert [r["rationale"] for r in a] == [r["rationale"] for r in b]
    assert all(isinstance(r["corrections"], int) for r in a)
    assert not any(first_slip(line) for r in a if not r["truncated"] for line in r["rationale"].splitlines())
