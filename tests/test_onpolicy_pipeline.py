"""On-policy distillation as a training option of `nestling distill` and `nestling run`: the options reach
every student's training, and a run that cannot do it (a preset student, a teacher that cannot score, a
tokenizer that does not fit) is refused in one line before any trace is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_run import make_run
from nestling.distill.pipeline import DistillConfig, check_specs, train_config
from nestling.distill.students import StudentPreset, load_student, new_student, save_student, train_tokenizer
from teacher_fakes import PromptLogprobsStandIn, StandIn

from nestling.core.errors import NestlingError

ROOT = Path(__file__).resolve().parents[1]
TASK = "rg:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1"
ONPOLICY = dict(lmbda=1.0, beta=1.0, kd_top_k=8, sample_temperature=0.7, max_new_tokens=12, onpolicy_fresh=3)


@pytest.fixture(scope="module")
def student_dir(tiny_student_dir: Path, tmp_path_factory) -> Path:
    """A small random student sharing the (tiny) teacher's tokenizer."""
    _, tok = load_student(tiny_student_dir)
    model = new_student(
        StudentPreset(64, 128, 2, 4, 2, vocab_size=len(tok), max_position_embeddings=256), tok
    )
    return save_student(model, tok, tmp_path_factory.mktemp("onp-pipeline") / "model")


@pytest.fixture(scope="module")
def other_tok_dir(tmp_path_factory) -> Path:
    """A model with a tokenizer of its own."""
    tok = train_tokenizer(["What is 1 + 2? Answer: 3", "completely different words here"] * 20, 300)
    model = new_student(StudentPreset(64, 128, 2, 4, 2, vocab_size=len(tok)), tok)
    return save_student(model, tok, tmp_path_factory.mktemp("other-tok") / "model")


def test_the_options_reach_every_students_train_config():
    cfg = DistillConfig(students=["a=gguf:smollm2", "b=gguf:smollm2?keep_layers=4"], steps=7, **ONPOLICY)
    for spec in cfg.students:
        t = train_config(cfg, spec)
        assert (t.lmbda, t.beta, t.kd_top_k, t.sample_temperature) == (1.0, 1.0, 8, 0.7)
        assert (t.max_new_tokens, t.onpolicy_fresh, t.steps, t.kd_teacher) == (12, 3, 7, "gguf:smollm2")
    # Unset options keep train's defaults; the scoring teacher defaults to the run's own teacher.
    plain = train_config(DistillConfig(students=["gguf:smollm2"]), "gguf:smollm2")
    assert (plain.lmbda, plain.beta, plain.kd_alpha) == (0.0, 0.5, 0.0)
    t = train_config(DistillConfig(students=["gguf:smollm2"], teacher="hf:t", lmbda=0.5), "gguf:smollm2")
    assert t.kd_teacher == "hf:t"


def test_nestling_run_passes_them_through_to_distill():
    from nestling.run import RunConfig, _overrides

    cfg = RunConfig(students=["gguf:smollm2"], kd_teacher="llamacpp:smollm2", compress=["none"], **ONPOLICY)
    dcfg = DistillConfig(out=cfg.out, **_overrides(cfg, DistillConfig))
    t = train_config(dcfg, "gguf:smollm2")
    assert (t.lmbda, t.beta, t.kd_top_k, t.kd_teacher) == (1.0, 1.0, 8, "llamacpp:smollm2")


def test_bad_options_and_preset_students_are_refused_when_the_config_is_built():
    with pytest.raises(NestlingError, match=r"--lmbda 2.0: must be in \[0, 1\]"):
        DistillConfig(students=["gguf:smollm2"], lmbda=2.0)
    with pytest.raises(NestlingError, match="--beta -1.0"):
        DistillConfig(students=["gguf:smollm2"], lmbda=0.5, beta=-1.0)
    with pytest.raises(NestlingError, match="'tiny' is a from-scratch preset with its own tokenizer") as e:
        DistillConfig(students=["tiny", "gguf:smollm2"], lmbda=0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(NestlingError, match="--kd-alpha 0.3: student 'nano'"):
        DistillConfig(students=["nano"], kd_alpha=0.3)
    DistillConfig(students=["tiny"], lmbda=0.0)  # off: presets train as before


def test_a_teacher_that_cannot_score_is_refused_before_traces(student_dir, tiny_student_dir):
    base = dict(students=[f"s=hf:{student_dir}"], task=TASK, lmbda=1.0)
    with StandIn() as chat:  # a chat server: it answers questions, it does not score given tokens
        with pytest.raises(NestlingError, match="scoring failed") as e:
            check_specs(DistillConfig(teacher=f"openai:m@{chat.url}", **base))
        assert "\n" not in str(e.value)
        assert all("messages" not in r for r in chat.requests)  # nothing was asked for a trace
        with pytest.raises(NestlingError, match="--kd-alpha needs a transformers teacher"):
            check_specs(DistillConfig(teacher=f"openai:m@{chat.url}", **{**base, "kd_alpha": 0.5}))

    def scores(ids, k):
        return [[(i, -1.0) for i in range(max(ids) + k)] for _ in ids[1:]]  # every id present

    with StandIn() as chat, PromptLogprobsStandIn(scores) as scorer:
        check_specs(
            DistillConfig(teacher=f"openai:m@{chat.url}", kd_teacher=f"openai:s@{scorer.url}", **base)
        )
        assert len(scorer.requests) == 1 and chat.requests == []  # one probe; the traces teacher untouched
    with pytest.raises(NestlingError, match="file not found"):
        check_specs(
            DistillConfig(teacher=f"hf:{tiny_student_dir}", kd_teacher="llamacpp:/no/such.gguf", **base)
        )


def test_a_tokenizer_mismatch_is_refused_before_traces(student_dir, tiny_student_dir, other_tok_dir):
    with StandIn() as chat:
        cfg = DistillConfig(
            students=[f"s=hf:{student_dir}", f"o=hf:{other_tok_dir}"], task=TASK,
            teacher=f"openai:m@{chat.url}", kd_teacher=f"hf:{tiny_student_dir}", lmbda=0.5, kd_alpha=0.5,
        )  # fmt: skip
        with pytest.raises(NestlingError, match="its tokenizer differs from the one of student") as e:
            check_specs(cfg)
        assert str(other_tok_dir) in str(e.value) and "\n" not in str(e.value)
        check_specs(DistillConfig(**{**cfg.__dict__, "students": [f"s=hf:{student_dir}"]}))
        assert chat.requests == []


def test_nestling_run_refuses_a_mismatch_at_second_0(tmp_path, student_dir, other_tok_dir):
    out = tmp_path / "run"
    with StandIn() as srv:
        cmd = [sys.executable, "-m", "nestling", "run", "--out", str(out), "--n", "8", "--task", TASK,
               "--teacher", f"openai:m@{srv.url}", "--students", f"hf:{student_dir}",
               "--kd-teacher", f"hf:{other_tok_dir}", "--lmbda", "1", "--compress", "none"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - t0
        assert srv.requests == []
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "tokenizer differs" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert seconds < 15 and not (out / "traces").exists()


def test_distill_trains_its_students_on_policy(tmp_path, student_dir, tiny_student_dir, monkeypatch):
    import nestling.distill.pipeline as pipeline
    from test_evaluate import ScriptedTeacher

    monkeypatch.setattr(pipeline, "_traces", lambda cfg: make_run(Path(cfg.out), n=40, heldout=6) / "traces")
    monkeypatch.setattr("nestling.distill.teachers.load_teacher", ScriptedTeacher)
    monkeypatch.setattr("nestling.distill.teachers.check_teacher_spec", lambda spec: None)  # gguf:fake
    cfg = DistillConfig(
        out=str(tmp_path / "run"), teacher="gguf:fake", kd_teacher=f"hf:{tiny_student_dir}",
        students=[f"s=hf:{student_dir}"], objective="cot", steps=4, lr=3e-3, threads=1, eval_limit=4,
        lmbda=1.0, beta=1.0, max_new_tokens=8,
    )  # fmt: skip
    pipeline.run_distill(cfg)
    manifest = json.loads((tmp_path / "run/students/s/manifest.json").read_text())
    assert manifest["config"]["lmbda"] == 1.0 and manifest["config"]["beta"] == 1.0
    assert manifest["config"]["kd_teacher"] == f"hf:{tiny_student_dir}"
    assert manifest["metrics"]["onpolicy_steps"] == 4 and manifest["metrics"]["onpolicy_prompts"] == 34
