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
from nestling.distill.teachers import Generation, Teacher
from nestling.distill.traces import TracesConfig, TraceStore, run_traces

from nestling import cli as nestling_cli
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
            out.append([Generation(texts[min(j, 3)], 10 + j, 0.5) for j in range(n)])
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
