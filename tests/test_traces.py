"""distill.traces: the stage's files, resume after kill -9, config checks and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nestling import cli as nestling_cli
from nestling.distill.teachers import Generation, Teacher
from nestling.distill.traces import TracesConfig, TraceStore, run_traces

from nestling.core.errors import NestlingError
from nestling.core.manifest import read_manifest

EASY = (
    "rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-&allow_negation=false"
    "&allow_parentheses=false"
)
ROOT = Path(__file__).resolve().parents[1]


class ScriptedTeacher(Teacher):
    """Sample 0: right with a true step; 1: right answer, false step; 2: wrong answer; 3+: no answer."""

    spec, params, batch = "fake", 1, 2

    def __init__(self):
        self.prompts = 0

    def generate(self, prompts, n, sampling):
        self.prompts += len(prompts)
        out = []
        for msgs in prompts:
            a, op, b = re.search(r"(\d+) ([-+]) (\d+)", msgs[-1]["content"]).groups()
            v = int(a) + int(b) if op == "+" else int(a) - int(b)
            texts = [
                f"Step 1: {a} {op} {b} = {v}.\nAnswer: {v}",
                f"Step 1: {a} * {b} = {int(a) * int(b) + 1}, so {a} {op} {b} = {v}.\nAnswer: {v}",
                f"Step 1: {a} {op} {b} = {v + 1}.\nAnswer: {v + 1}",
                "I cannot do this.",
            ]
            first = sampling.seed % 1000  # a call for samples 2.. is seeded seed + 2
            out.append([Generation(texts[min(first + j, 3)], 10 + first + j, 0.5) for j in range(n)])
        return out


@pytest.fixture
def fake_teacher(monkeypatch):
    teachers = []

    def load(spec, n_threads=None, **kw):
        t = ScriptedTeacher()
        teachers.append(t)
        return t

    monkeypatch.setattr("nestling.distill.traces.load_teacher", load)
    return teachers


def cfg(tmp_path, **kw):
    return TracesConfig(
        **{"task": EASY, "n": 20, "heldout": 4, "samples": 4, "out": str(tmp_path / "run"), **kw}
    )


def read_jsonl(p):
    return [json.loads(line) for line in Path(p).read_text().splitlines()]


def test_run_traces_writes_the_stage_files_and_an_honest_datacard(tmp_path, fake_teacher):
    out = run_traces(cfg(tmp_path), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "coverage.png",
        "datacard.json",
        "kept.jsonl",
        "manifest.json",
        "questions.jsonl",
        "traces.jsonl",
    ]
    questions = read_jsonl(out / "questions.jsonl")
    assert [q["split"] for q in questions].count("heldout") == 4 and len(questions) == 20
    traces = read_jsonl(out / "traces.jsonl")
    train_ids = {q["id"] for q in questions if q["split"] == "train"}
    assert len(traces) == 16 * 4 and {t["qid"] for t in traces} == train_ids  # no held-out question is traced
    t = traces[0]
    assert set(t) >= {
        "id",
        "qid",
        "sample",
        "task",
        "question",
        "gold",
        "teacher",
        "sampling",
        "seed",
        "prompt_hash",
        "rationale",
        "answer",
        "correct",
        "tokens",
        "seconds",
    }
    assert t["sampling"] == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64}
    assert [r["correct"] for r in traces[:4]] == [True, True, False, False]
    assert [r["seed"] for r in traces[:4]] == [0, 1, 2, 3]
    kept = read_jsonl(out / "kept.jsonl")
    assert len(kept) == 16 and all(r["source"] == "verified" and len(r["steps"]) == 1 for r in kept)
    assert all(r["answer"] == next(q["gold"] for q in questions if q["id"] == r["qid"]) for r in kept)
    card = json.loads((out / "datacard.json").read_text())
    assert card["records"] == 64 and card["kept"] == 16 and card["coverage"] == 1.0
    assert card["sample_accuracy"] == 0.5 and card["right_answer_wrong_steps"] == 16
    grounding = card["grounding"]
    assert grounding["mode"] == "grounded" and grounding["checked_only"]["kept"] >= grounding["kept"] == 16
    assert [f["kept"] for f in card["filters"]] == [48, 48, 32, 16, 16]
    assert card["time"]["teacher_seconds"] == 32.0 and card["rationales_per_s"] == 2.0
    assert card["questions"] == {"requested": 20, "drawn": 20, "train": 16, "heldout": 4}
    assert card["trivial_baseline"]["train_accuracy"] > 0
    assert read_manifest(out, stage="traces")["metrics"]["kept"] == 16


def test_traces_load_with_datasets(tmp_path, fake_teacher):
    datasets = pytest.importorskip("datasets")
    out = run_traces(cfg(tmp_path, n=8, heldout=2), progress=False)
    ds = datasets.load_dataset("json", data_files=str(out / "traces.jsonl"), split="train")
    assert len(ds) == 24 and ds[0]["sampling"]["max_tokens"] == 64
    kept = datasets.load_dataset("json", data_files=str(out / "kept.jsonl"), split="train")
    assert kept[0]["steps"]


def test_a_complete_stage_is_skipped_and_a_partial_one_resumes_exactly(tmp_path, fake_teacher):
    c = cfg(tmp_path)
    out = run_traces(c, progress=False)
    full = (out / "traces.jsonl").read_bytes()
    run_traces(c, progress=False)
    assert len(fake_teacher) == 1  # fresh manifest: no teacher loaded
    # Simulate a crash: half the records, a torn tail, no manifest.
    lines = full.splitlines(keepends=True)
    (out / "traces.jsonl").write_bytes(b"".join(lines[:30]) + lines[30][:17])
    (out / "manifest.json").unlink()
    run_traces(c, progress=False)
    after = read_jsonl(out / "traces.jsonl")
    assert len(after) == 64 and len({r["id"] for r in after}) == 64
    assert (out / "traces.jsonl").read_bytes()[: sum(map(len, lines[:30]))] == b"".join(lines[:30])
    assert json.loads((out / "datacard.json").read_text())["torn_bytes_repaired"] == 17
    # Only unfinished questions went back to the teacher: 30 records = 7 whole questions + 2 samples of one.
    assert fake_teacher[-1].prompts == 9


def test_more_samples_extend_a_run_but_other_settings_are_refused(tmp_path, fake_teacher):
    run_traces(cfg(tmp_path, samples=2), progress=False)
    out = run_traces(cfg(tmp_path, samples=3), progress=False)
    assert len(read_jsonl(out / "traces.jsonl")) == 48
    with pytest.raises(NestlingError, match="sampling"):
        run_traces(cfg(tmp_path, samples=3, temperature=0.2), progress=False)
    with pytest.raises(NestlingError, match="another teacher prompt"):
        run_traces(cfg(tmp_path, samples=3, fewshot=False), progress=False)
    with pytest.raises(NestlingError, match="another task, n, heldout or seed"):
        run_traces(cfg(tmp_path, seed=1), progress=False)


def test_trace_store_appends_whole_lines_and_repairs_a_torn_tail(tmp_path):
    p = tmp_path / "t.jsonl"
    s = TraceStore(p)
    assert s.append({"id": "a", "x": 1}) and not s.append({"id": "a", "x": 2})
    assert s.append({"id": "b", "x": "é"})
    with open(p, "ab") as f:
        f.write(b'{"id": "c", "x"')
    s2 = TraceStore(p)
    assert [r["id"] for r in s2.records] == ["a", "b"] and s2.repaired_bytes == 15
    assert p.read_bytes().endswith(b"\n")
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(NestlingError, match="line 2"):
        TraceStore(p)


def test_group_commit_writes_new_records_once_and_a_torn_group_keeps_its_whole_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    s = TraceStore(p)
    assert s.append_many([{"id": "a"}, {"id": "b"}, {"id": "a"}]) == 2
    assert s.append_many([{"id": "b"}, {"id": "c"}]) == 1 and s.append_many([]) == 0
    assert [r["id"] for r in TraceStore(p).records] == ["a", "b", "c"]
    with open(p, "ab") as f:  # a group cut short by a crash mid-write: whole lines survive, the tail goes
        f.write(b'{"id": "d"}\n{"id": "e"}\n{"id": "f", "x')
    s2 = TraceStore(p)
    assert [r["id"] for r in s2.records] == ["a", "b", "c", "d", "e"]
    assert s2.repaired_bytes == len(b'{"id": "f", "x')


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"samples": 0}, "--samples"),
        ({"n": 0}, "--n"),
        ({"heldout": -1}, "--heldout"),
        ({"heldout": 20}, "smaller than"),
        ({"temperature": -0.5}, "--temperature"),
        ({"top_p": 0}, "--top-p"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"task": "gsm8k"}, "--task"),
        ({"teacher": "gpt4"}, "--teacher"),
        ({"vote_threshold": 2.0}, "vote_threshold"),
    ],
)
def test_bad_config_values(tmp_path, kw, fragment):
    with pytest.raises(NestlingError, match=fragment):
        cfg(tmp_path, **kw)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--task", "rg:no_such_thing"], "no dataset"),
        (["--task", "file:/nonexistent.jsonl"], "not found"),
        (["--samples", "0"], "--samples"),
        (["--teacher", "gguf:/nonexistent.gguf"], "file not found"),
        (["--teacher", "openai:m@http://127.0.0.1:{port}/v1"], "cannot reach"),
        (["--task", "file:{bad}"], "line 2"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, fragment):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{oops\n')
    args = [a.format(port=_free_port(), bad=bad) for a in args]
    code = nestling_cli.main(["traces", "--n", "4", "--heldout", "1", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and fragment in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_prints_a_summary_table(tmp_path, capsys, fake_teacher):
    code = nestling_cli.main(
        ["traces", "--task", EASY, "--n", "6", "--heldout", "2", "--out", str(tmp_path / "r")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "right answer, wrong steps" in out and "4 removed" in out and "filter steps" in out
    assert "coverage curve" in out and "k=4 100.0%" in out.replace("\n", " ")


def test_the_calculator_reaches_the_teacher_and_the_card_counts_its_corrections(
    tmp_path, capsys, monkeypatch
):
    loaded = []

    class Corrected(ScriptedTeacher):
        """Sample 0 (the right one) as a calculator would hand it back: one false result replaced."""

        def generate(self, prompts, n, sampling):
            out = super().generate(prompts, n, sampling)
            for row in out:
                if sampling.seed % 1000 == 0:
                    row[0].corrections = 1
            return out

    def load(spec, n_threads=None, **kw):
        loaded.append(kw)
        return Corrected()

    monkeypatch.setattr("nestling.distill.traces.load_teacher", load)
    run = tmp_path / "r"
    argv = ["traces", "--task", EASY, "--n", "6", "--heldout", "2", "--out", str(run), "--calculator"]
    assert nestling_cli.main(argv) == 0
    assert loaded and all(kw["calculator"] is True for kw in loaded)
    recs = read_jsonl(run / "traces" / "traces.jsonl")
    assert sorted(r["corrections"] for r in recs) == [0] * 12 + [1] * 4
    card = json.loads((run / "traces" / "datacard.json").read_text())
    assert card["calculator"] == {"corrections": 4, "rationales_corrected": 4, "right_answer_corrected": 4}
    assert "4 false results replaced in 4 rationales" in capsys.readouterr().out.replace("\n", " ")


def test_cli_shows_a_mix_by_part_and_the_adaptive_cost(tmp_path, capsys, graded):
    three = EASY.replace("min_terms=2&max_terms=2", "min_terms=3&max_terms=3")
    args = ["traces", "--task", f"mix:{EASY},{three}", "--n", "12", "--heldout", "2", "--adaptive"]
    assert nestling_cli.main([*args, "--max-samples", "3", "--out", str(tmp_path / "r")]) == 0
    out = re.sub(r"[\s│]+", " ", capsys.readouterr().out)  # the table wraps long cells
    assert "(2 terms)" in out and "(3 terms)" in out and "kept by task" in out
    assert re.search(r"vs [\d,]+ for the flat k=\d that reaches the same coverage", out)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_loses_nothing_and_duplicates_nothing(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "nestling",
        "traces",
        "--task",
        EASY,
        "--teacher",
        "gguf:smollm2",
        "--samples",
        "2",
        "--n",
        "44",
        "--heldout",
        "4",
        "--max-tokens",
        "12",
        "--threads",
        "1",
        "--out",
        str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    traces = run / "traces" / "traces.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (traces.exists() and traces.read_bytes().count(b"\n") >= 12):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no traces written in 240 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = traces.read_bytes()
    done = before[: before.rfind(b"\n") + 1].splitlines()
    assert 12 <= len(done) < 80, "the run finished before it could be killed"
    with open(traces, "ab") as f:  # a torn line, as a power cut mid-write would leave
        f.write(b'{"id": "q000099:0", "qid": "q0')
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{80 - len(done)} rationales to write" in r.stderr
    after = traces.read_bytes()
    assert after.endswith(b"\n")
    lines = after.splitlines()
    assert lines[: len(done)] == done  # every finished record kept, byte for byte
    records = [json.loads(line) for line in lines]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 80
    train = [q["id"] for q in read_jsonl(run / "traces" / "questions.jsonl") if q["split"] == "train"]
    assert set(ids) == {f"{q}:{j}" for q in train for j in range(2)}
    assert read_manifest(run / "traces", stage="traces")["metrics"]["records"] == 80


def test_the_default_heldout_is_half_the_questions_at_most_200():
    assert TracesConfig().heldout == 200 and TracesConfig().n == 400
    assert TracesConfig(n=100).heldout == 50
    assert TracesConfig(n=100, heldout=0.2).heldout == 0.2


def test_a_small_task_keeps_half_its_questions_for_training(tmp_path):
    from nestling.distill.tasks import load_task
    from nestling.distill.traces import _questions

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(30))
    )
    c = TracesConfig(task=f"file:{data}", out=str(tmp_path / "run"))  # default: n 400, 200 held out
    (tmp_path / "run" / "traces").mkdir(parents=True)
    train, held, _ = _questions(load_task(c.task), c, tmp_path / "run" / "traces")
    assert (len(train), len(held)) == (15, 15)


class GradedTeacher(Teacher):
    """Question "a op b" is first answered right at sample a % 5 (a true step, worded per sample so every
    right one is a distinct rationale) and wrong before; a >= 7 is never answered right. Sample j costs
    10 + j tokens and 0.5 s. ``fail_after`` calls, it raises as a killed process would stop."""

    spec, params, batch = "fake", 1, 2
    WORDS = ("So", "Thus", "Hence", "Then", "Now", "Next", "Here", "Also")

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after, self.asked = 0, fail_after, []

    def generate(self, prompts, n, sampling):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        out = []
        for msgs in prompts:
            a, op, b = re.search(r"(\d+) ([-+]) (\d+)", msgs[-1]["content"]).groups()
            v = int(a) + int(b) if op == "+" else int(a) - int(b)
            row = []
            for j in range(sampling.seed % 1000, sampling.seed % 1000 + n):
                self.asked.append((msgs[-1]["content"], j))
                right = int(a) < 7 and j >= int(a) % 5
                w = v if right else v + 1
                row.append(Generation(f"{self.WORDS[j % 8]} {a} {op} {b} = {w}.\nAnswer: {w}", 10 + j, 0.5))
            out.append(row)
        return out


@pytest.fixture
def graded(monkeypatch):
    teachers = []

    def load(spec, n_threads=None, **kw):
        teachers.append(GradedTeacher(kw.pop("fail_after", None)))
        return teachers[-1]

    monkeypatch.setattr("nestling.distill.traces.load_teacher", load)
    return teachers


def _first_operand(questions, qid):
    q = next(q for q in questions if q["id"] == qid)
    return int(re.search(r"(\d+) [-+] \d+", q["question"]).group(1))


def _drawn(out):
    counts = {}
    for r in read_jsonl(out / "traces.jsonl"):
        counts[r["qid"]] = counts.get(r["qid"], 0) + 1
    return counts


def test_adaptive_stops_solved_questions_early_and_spends_the_rest_on_unsolved_ones(tmp_path, graded):
    out = run_traces(cfg(tmp_path, n=30, heldout=6, adaptive=True, max_samples=5), progress=False)
    questions = read_jsonl(out / "questions.jsonl")
    train = [q["id"] for q in questions if q["split"] == "train"]
    drawn = _drawn(out)
    assert set(drawn) == set(train)
    for qid in train:
        a = _first_operand(questions, qid)
        assert drawn[qid] == (a % 5 + 1 if a < 7 else 5), (qid, a)  # stop at the first right one, else cap
    never = sum(_first_operand(questions, q) >= 7 for q in train)
    card = json.loads((out / "datacard.json").read_text())
    ad = card["adaptive"]
    assert ad["questions_never_solved"] == never > 0 and ad["questions_solved"] == len(train) - never
    assert ad["stopped_by"] == "done" and ad["questions_unfinished"] == 0
    assert card["coverage"] == round((len(train) - never) / len(train), 4)
    assert ad["teacher_tokens"] == sum(r["tokens"] for r in read_jsonl(out / "traces.jsonl"))


def test_adaptive_matches_flat_coverage_for_fewer_tokens_and_the_card_says_how_many(tmp_path, graded):
    # The teacher's last first-right sample is 4: coverage is flat from k=5 to k=6.
    flat = run_traces(cfg(tmp_path / "f", n=30, heldout=6, samples=6), progress=False)
    ada = run_traces(cfg(tmp_path / "a", n=30, heldout=6, adaptive=True, max_samples=6), progress=False)
    fc, ac = (json.loads((d / "datacard.json").read_text()) for d in (flat, ada))
    assert fc["coverage"] == ac["coverage"]
    flat_recs = {r["id"]: r["rationale"] for r in read_jsonl(flat / "traces.jsonl")}
    ada_recs = {r["id"]: r["rationale"] for r in read_jsonl(ada / "traces.jsonl")}
    assert ada_recs.items() <= flat_recs.items()  # same seeds: adaptive drew a subset of the flat samples
    f_cost, a_cost = fc["sampling_cost"], ac["sampling_cost"]
    # The flat run's card simulates adaptive from its own samples; the adaptive run's card is what it spent.
    assert f_cost["adaptive"]["tokens"] == a_cost["adaptive"]["tokens"] == ac["adaptive"]["teacher_tokens"]
    assert (
        f_cost["flat"]["tokens"] == fc["time"]["tokens"] and f_cost["flat"]["tokens_estimated_samples"] == 0
    )
    assert a_cost["flat"]["tokens_estimated_samples"] == len(flat_recs) - len(ada_recs)
    assert a_cost["adaptive_token_share"] < 1 and a_cost["tokens_saved"] > 0
    assert [p["coverage"] for p in f_cost["curve"]] == [p["coverage"] for p in a_cost["curve"]]
    curve = [p["coverage"] for p in f_cost["curve"]]
    assert curve == sorted(curve) and curve[0] < curve[-1] == fc["coverage"]
    # Coverage against samples drawn: the adaptive run drew exactly what its curve's last point says.
    last = a_cost["curve"][-1]
    assert last["samples_adaptive"] == len(ada_recs) == f_cost["curve"][-1]["samples_adaptive"]
    assert last["samples_flat"] == len(flat_recs) and all(p["exact"] for p in a_cost["curve"])
    # Against the smallest flat k that reaches the same coverage, not just the largest one.
    same = f_cost["flat_same_coverage"]
    assert same["k"] == a_cost["flat_same_coverage"]["k"] == curve.index(curve[-1]) + 1 == 5
    assert same["tokens"] == sum(
        r["tokens"] for r in read_jsonl(flat / "traces.jsonl") if r["sample"] < same["k"]
    )
    assert same["adaptive_token_share"] == round(a_cost["adaptive"]["tokens"] / same["tokens"], 4)
    assert (ada / "coverage.png").read_bytes()[:4] == b"\x89PNG"


def test_adaptive_stop_after_m_keeps_sampling_until_m_distinct_verified_rationales(tmp_path, graded):
    out = run_traces(
        cfg(tmp_path, n=30, heldout=6, adaptive=True, max_samples=6, stop_after=2), progress=False
    )
    questions = read_jsonl(out / "questions.jsonl")
    drawn = _drawn(out)
    for qid, n in drawn.items():
        a = _first_operand(questions, qid)
        assert n == (min(a % 5 + 2, 6) if a < 7 else 6), (qid, a)
    kept = read_jsonl(out / "kept.jsonl")
    per_q = {}
    for row in kept:
        per_q[row["qid"]] = per_q.get(row["qid"], 0) + 1
    assert all(v <= 2 for v in per_q.values()) and 2 in per_q.values()


# Round 1 costs 24 x 10 tokens (12 s): each budget runs out part-way through round 2.
@pytest.mark.parametrize("budget", [{"budget_tokens": 400}, {"budget_seconds": 20.0}])
def test_adaptive_respects_a_total_budget_spending_it_on_the_least_sampled_questions_first(
    tmp_path, graded, budget
):
    out = run_traces(cfg(tmp_path, n=30, heldout=6, adaptive=True, max_samples=8, **budget), progress=False)
    recs = read_jsonl(out / "traces.jsonl")
    card = json.loads((out / "datacard.json").read_text())
    ad = card["adaptive"]
    name, limit = next(iter(budget.items()))
    spent = sum(r["tokens" if name == "budget_tokens" else "seconds"] for r in recs)
    per_group = 2 * (10 + 8 if name == "budget_tokens" else 0.5)  # a group of batch 2 may finish past it
    assert limit <= spent < limit + per_group and ad["stopped_by"] == name
    assert ad["questions_unfinished"] > 0 and card["teacher_errors"]["samples_missing"] == 0
    drawn = _drawn(out)
    assert len(drawn) == 24 and max(drawn.values()) - min(drawn.values()) <= 1  # rounds, not depth-first
    assert not card["sampling_cost"]["curve"][-1]["exact"]  # unsolved questions short of 8 samples
    # The budget is spent: the same command resumes nothing and asks the teacher for nothing.
    run_traces(cfg(tmp_path, n=30, heldout=6, adaptive=True, max_samples=8, **budget), progress=False)
    assert len(graded) == 1 and len(read_jsonl(out / "traces.jsonl")) == len(recs)


def test_adaptive_killed_mid_round_resumes_to_the_same_records_without_duplicates(
    tmp_path, graded, monkeypatch
):
    c = cfg(tmp_path / "whole", n=30, heldout=6, adaptive=True, max_samples=5)
    whole = {r["id"]: r["rationale"] for r in read_jsonl(run_traces(c, progress=False) / "traces.jsonl")}
    c = cfg(tmp_path / "killed", n=30, heldout=6, adaptive=True, max_samples=5)
    for fail_after in (7, 13):  # killed twice: in round 1, then mid-way through a later round
        monkeypatch.setattr(
            "nestling.distill.traces.load_teacher",
            lambda spec, n_threads=None, fa=fail_after, **kw: GradedTeacher(fa),
        )
        with pytest.raises(KeyboardInterrupt):
            run_traces(c, progress=False)
    path = tmp_path / "killed" / "run" / "traces" / "traces.jsonl"
    before = path.read_bytes()
    assert not (tmp_path / "killed" / "run" / "traces" / "manifest.json").exists()
    resumed = GradedTeacher()
    monkeypatch.setattr("nestling.distill.traces.load_teacher", lambda spec, n_threads=None, **kw: resumed)
    run_traces(c, progress=False)
    after = read_jsonl(path)
    assert path.read_bytes().startswith(before)  # append-only: what was stored stays, byte for byte
    assert len(after) == len({r["id"] for r in after}) == len(whole)
    assert {r["id"]: r["rationale"] for r in after} == whole
    stored = {tuple(x.split(":")) for x in {r["id"] for r in read_jsonl(path)[: before.count(b"\n")]}}
    asked = {(q, j) for q, j in resumed.asked}
    assert len(asked) == len(resumed.asked) == len(whole) - len(stored)  # nothing asked for twice


def test_adaptive_flags_are_checked(tmp_path):
    with pytest.raises(NestlingError, match="only with --adaptive"):
        cfg(tmp_path, max_samples=8)
    with pytest.raises(NestlingError, match="--budget-tokens"):
        cfg(tmp_path, adaptive=True, budget_tokens=0)
    with pytest.raises(NestlingError, match="--stop-after"):
        cfg(tmp_path, adaptive=True, stop_after=0)
    assert cfg(tmp_path, adaptive=True, samples=3).max_samples == 6
    assert "adaptive" not in cfg(tmp_path).identity()  # flat runs written before these fields stay fresh


def test_distill_and_run_stop_after_traces_when_the_teacher_cannot_do_the_task(tmp_path, capsys, monkeypatch):
    class Hopeless(GradedTeacher):
        def generate(self, prompts, n, sampling):
            return [[Generation("I think it is 99.\nAnswer: 99", 12, 0.1)] * n for _ in prompts]

    monkeypatch.setattr("nestling.distill.traces.load_teacher", lambda spec, n_threads=None, **kw: Hopeless())

    def no_training(cfg):
        raise AssertionError("trained a student on a task the teacher cannot do")

    monkeypatch.setattr("nestling.distill.train.train", no_training)
    for command in ("distill", "run"):
        out = tmp_path / command
        args = [command, "--task", EASY, "--n", "12", "--heldout", "2", "--samples", "2", "--out", str(out)]
        assert nestling_cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: traces: the teacher") and "0 of 10 training questions" in err[-1]
        assert "--min-coverage" in err[-1] and (out / "traces" / "kept.jsonl").exists()
    # `run` samples adaptively by default (up to 6 per question), `distill` a flat --samples.
    run_traces_cfg = read_manifest(tmp_path / "run" / "traces")["config"]
    assert run_traces_cfg["adaptive"] and run_traces_cfg["max_samples"] == 6
    assert "adaptive" not in read_manifest(tmp_path / "distill" / "traces")["config"]
    card = json.loads((tmp_path / "run" / "traces" / "datacard.json").read_text())
    assert card["adaptive"]["questions_never_solved"] == 10 and card["records"] == 60
    assert card["coverage_by_task"] == {EASY: {"train": 10, "covered": 0, "coverage": 0.0}}
    assert (
        nestling_cli.main([*args[:-1], str(tmp_path / "run0"), "--min-coverage", "0.5", "--students", "tiny"])
        == 2
    )


class WrongTeacher(GradedTeacher):
    """Every answer one off: no rationale is ever verified."""

    def generate(self, prompts, n, sampling):
        return [[Generation("So it is 1 + 1 = 3.\nAnswer: 3", 10, 0.1) for _ in range(n)] for _ in prompts]


def test_a_task_the_teacher_cannot_do_stops_after_traces_in_one_line(tmp_path, monkeypatch):
    from nestling.distill.pipeline import DistillConfig, run_distill

    monkeypatch.setattr(
        "nestling.distill.traces.load_teacher", lambda spec, n_threads=None, **kw: WrongTeacher()
    )
    c = DistillConfig(out=str(tmp_path / "run"), task=EASY, n=20, samples=2, students=["tiny"])
    with pytest.raises(NestlingError) as err:
        run_distill(c, checked=True)
    msg = str(err.value)
    assert "\n" not in msg and "cannot do task" in msg and "--min-coverage" in msg
    assert (tmp_path / "run" / "traces" / "manifest.json").exists()  # the traces are kept for a look
    assert not (tmp_path / "run" / "students").exists()  # nothing was trained
