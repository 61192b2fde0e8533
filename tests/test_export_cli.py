"""`nestling export`: the manifest contract, skip on re-run, loud failures and nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from nestling import cli as nestling_cli
from nestling.distill.tasks import TaskScorer
from nestling.export.parity import Prompt
from nestling.export.pipeline import VARIANTS, ExportConfig, export_student, student_fingerprint

from nestling.core.errors import NestlingError
from nestling.core.manifest import read_manifest, verify_files


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


def test_manifest_follows_the_design(tiny_export_dir: Path, tiny_student_dir: Path):
    m = read_manifest(tiny_export_dir, "export")
    verify_files(tiny_export_dir, m)  # every listed file exists with its size and sha256
    on_disk = {p.relative_to(tiny_export_dir).as_posix() for p in tiny_export_dir.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"manifest.json"}
    assert m["prompt_format"] == "nestling-v1"
    assert m["student"]["sha256"] == student_fingerprint(tiny_student_dir) == m["inputs"]["student"]
    assert m["student"]["params"] > 1e6
    assert set(m["variants"]) == set(VARIANTS) and m["default_variant"] in m["variants"]
    for name, v in m["variants"].items():
        assert v["engine"] == VARIANTS[name]["engine"] and v["path"] == VARIANTS[name]["path"]
        assert v["bytes"] == sum(f["bytes"] for k, f in m["files"].items() if k.startswith(v["path"]))
        p = v["parity"]
        assert p["tokenization_match"] == 1.0
        assert 0.0 <= v["accuracy"] <= 1.0 and v["tokens_per_s"] > 0
        assert v["accuracy_delta"] == pytest.approx(v["accuracy"] - m["metrics"]["pytorch"]["accuracy"])
        if name in ("onnx-fp32", "gguf-f16"):
            assert p["exact_required"] and p["greedy_match_within_tol"] == 1.0
            assert p["max_abs_logit_diff"] <= p["logit_tol"]
        else:
            assert p["teacher_forced_top1"] >= 0.8
    assert m["variants"]["onnx-fp32"]["parity"]["max_abs_logit_diff"] < 1e-3
    modelfile = (tiny_export_dir / "Modelfile").read_text()
    src = modelfile.splitlines()[0].removeprefix("FROM ./")
    assert (tiny_export_dir / src).is_file() and src.endswith(".gguf")
    assert 'PARAMETER stop "<|eos|>"' in modelfile and "PARAMETER temperature 0" in modelfile
    assert 'TEMPLATE """Question: {{ .Prompt }}\nExplain:"""' in modelfile
    card = (tiny_export_dir / "README.md").read_text()
    assert all(f"| {name}" in card for name in VARIANTS)
    assert not [p for p in _leftovers(tiny_export_dir.parent, "tiny") if p != "tiny"]


def test_rerun_over_complete_export_is_skipped(tiny_export_dir, tiny_student_dir, tiny_prompts, monkeypatch):
    import nestling.export.pipeline as pipeline

    before = (tiny_export_dir / "manifest.json").read_text()

    def must_not_run(*a, **k):
        raise AssertionError("a fresh export was rebuilt")

    monkeypatch.setattr(pipeline, "_export_into", must_not_run)
    cfg = ExportConfig(student=str(tiny_student_dir), out=str(tiny_export_dir), threads=1)
    assert export_student(cfg, prompts=tiny_prompts)["created"] == json.loads(before)["created"]
    # A different config is not fresh: it would rebuild (and here hits the stub).
    with pytest.raises(AssertionError, match="rebuilt"):
        export_student(
            ExportConfig(student=str(tiny_student_dir), out=str(tiny_export_dir), max_new_tokens=7),
            prompts=tiny_prompts,
        )
    assert (tiny_export_dir / "manifest.json").read_text() == before


def _broken_student(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "not-llama":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (dst / "config.json").write_text(json.dumps(cfg))
    elif how == "no-tokenizer":
        (dst / "tokenizer.json").unlink()
    elif how == "corrupt-weights":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("not-llama", "nestling students are one of"),
        ("no-tokenizer", "no tokenizer.json"),
        ("corrupt-weights", "cannot load the student"),
        ("missing", "not found"),
    ],
)
def test_bad_student_fails_cleanly(tiny_student_dir, tmp_path, capsys, how, message):
    student = tmp_path / "student"
    if how != "missing":
        _broken_student(tiny_student_dir, student, how)
    out = tmp_path / "exports" / "x"
    rc = nestling_cli.main(["export", str(student), "--out", str(out), "--variants", "gguf-f16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()
    assert not (out.parent.exists() and _leftovers(out.parent, "x"))


@pytest.mark.parametrize("variant", ["gguf-f16", "gguf-q8_0"])  # q8_0 alone: its unshipped f16 is checked
def test_parity_failure_fails_loudly_and_leaves_nothing(
    tiny_student_dir, tiny_prompts, tmp_path, monkeypatch, variant
):
    import nestling.export.gguf as export_gguf

    # The classic converter bug: forget llama.cpp's q/k permutation.
    monkeypatch.setattr(export_gguf, "permute_qk", lambda w, n_head: w)
    out = tmp_path / "bad"
    cfg = ExportConfig(student=str(tiny_student_dir), out=str(out), variants=[variant])
    with pytest.raises(
        NestlingError, match="export parity failed.*gguf-f16.*greedy tokens differ|logit diff"
    ):
        export_student(cfg, prompts=tiny_prompts)
    assert not out.exists() and _leftovers(tmp_path, "bad") == []


def test_interrupted_export_leaves_nothing(tiny_student_dir, tiny_prompts, tmp_path, monkeypatch):
    import nestling.export.pipeline as pipeline

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "check_variant", interrupt)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        export_student(ExportConfig(student=str(tiny_student_dir), out=str(out)), prompts=tiny_prompts)
    assert _leftovers(tmp_path, "cut") == []


def test_cli_in_a_run_dir_uses_heldout_questions(tiny_student_dir, tmp_path, capsys):
    run = tmp_path / "run"
    student = run / "students" / "tiny" / "model"
    shutil.copytree(tiny_student_dir, student)
    rows = [
        {"id": f"q{i}", "task": "file:qs.jsonl", "question": f"What is {i} + 1?", "gold": str(i + 1)}
        for i in range(9)
    ]
    for i, r in enumerate(rows):
        r["split"] = "heldout" if i % 3 else "train"
    (run / "traces").mkdir()
    (run / "traces" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run / "exports" / "tiny"
    argv = ["export", str(student), "--out", str(out), "--variants", "gguf-q8_0", "--parity-prompts", "4"]
    assert nestling_cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "gguf-q8_0*" in stdout and "pytorch" in stdout
    m = read_manifest(out, "export")
    assert m["student"]["name"] == "tiny"
    assert m["metrics"]["parity_prompts"] == 4 and "questions.jsonl" in m["metrics"]["prompt_source"]
    assert m["task"] == "file:qs.jsonl"
    assert list(m["variants"]) == ["gguf-q8_0"] and m["default_variant"] == "gguf-q8_0"
    # the f16 GGUF was only the quantizer's input: not shipped, not listed
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["model-q8_0.gguf"]
    assert "FROM ./gguf/model-q8_0.gguf" in (out / "Modelfile").read_text()


def test_scorer_falls_back_to_answer_matching():
    score = TaskScorer()
    assert score("Step 1: 3 + 4 = 7\nAnswer: 7", Prompt("What is 3 + 4?", "7"))
    assert not score("Step 1: 3 + 4 = 8\nAnswer: 8", Prompt("What is 3 + 4?", "7"))
    assert not score("no idea", Prompt("What is 3 + 4?", None))


class _ScriptedEngine:
    """Replays fixed greedy tokens and teacher-forced logits: exercises parity's bookkeeping exactly."""

    kind, eos_id, bos_id = "fake", 0, None

    def __init__(self, out: list[int], logits):
        self.out, self._logits = out, logits

    def tokenize(self, text: str) -> list[int]:
        return [len(text) % 7 + 1]

    def stream(self, ids, max_tokens, stop_at_eos=True):
        yield from self.out[:max_tokens]

    def logits(self, ids):
        return self._logits

    def detokenize(self, ids) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize(("margin", "tie"), [(0.001, True), (0.5, False)])
def test_greedy_divergence_counts_as_tie_only_within_measured_error(margin, tie):
    import numpy as np
    from nestling.export.parity import Reference, check_variant

    ids, want = [3, 4], [7, 8]  # PyTorch: 7 then 8; the engine says 7 then 9
    ref_logits = np.zeros((4, 10), dtype=np.float32)
    ref_logits[1, 7] = 5.0
    ref_logits[2, 8], ref_logits[2, 9] = 1.0, 1.0 - margin
    ref_logits[3, 0] = 5.0
    eng_logits = ref_logits.copy()
    eng_logits[2, 9] += 0.002  # the engine's logit error at the divergence
    ref = Reference([ids], [want], [ref_logits], ["7 8"], None, 100.0)
    res = check_variant(
        "x",
        _ScriptedEngine([7, 9], eng_logits),
        ref,
        lambda t: {"input_ids": [len(t) % 7 + 1]},
        [Prompt("q", None)],
        max_new_tokens=8,
        logit_tol=0.01,
        exact=True,
    )
    assert res.greedy_match == 0.0 and res.max_abs_logit_diff == pytest.approx(0.002, abs=1e-6)
    assert res.greedy_match_within_tol == (1.0 if tie else 0.0)
    assert bool(res.failures) is (not tie)
    # at the tie the engine's argmax flips (1 of 3 generated positions); 0.5 apart it does not
    assert res.teacher_forced_top1 == pytest.approx(2 / 3 if tie else 1.0)


def test_scorer_uses_the_task_when_it_loads(monkeypatch):
    import nestling.distill.tasks as distill_tasks
    from nestling.distill.tasks import Example

    class Words:  # a task whose own extractor and scorer differ from core.explain's defaults
        def extract(self, text: str) -> str:
            return text.rsplit(" ", 1)[-1]

        def score(self, answer, example) -> bool:
            return answer == "forty-two" and example.gold == "42"

    monkeypatch.setattr(distill_tasks, "load_task", lambda spec: Words())
    ex = Example("q1", "words:x", "What is 6 * 7?", "42")
    p = Prompt(ex.question, ex.gold, example=ex)
    score = TaskScorer()
    assert score("Answer: forty-two", p)
    assert not score("Answer: 42", p)  # the lenient default would have said yes


def test_default_variant_rule():
    from nestling.export.pipeline import choose_default

    def v(engine, delta, top1, speed):
        return {
            "engine": engine,
            "accuracy_delta": delta,
            "parity": {"teacher_forced_top1": top1},
            "tokens_per_s": speed,
        }

    variants = {
        "onnx-int8": v("onnx", 0.0, 0.99, 3000.0),
        "gguf-q8_0": v("gguf", -0.01, 0.99, 6000.0),
        "gguf-q4_k_m": v("gguf", -0.05, 0.97, 7000.0),  # fastest, but loses 5 points
        "gguf-f16": v("gguf", 0.0, 0.90, 6500.0),  # agrees too rarely, teacher-forced
    }
    assert choose_default(variants, tolerance=0.02) == "gguf-q8_0"
    assert choose_default(variants, tolerance=0.10) == "gguf-q4_k_m"
    assert choose_default(variants, tolerance=0.02, engine="onnx") == "onnx-int8"
    unscored = {k: {**x, "accuracy_delta": None} for k, x in variants.items()}
    assert choose_default(unscored, tolerance=0.0) == "gguf-q4_k_m"


def test_a_failed_publish_keeps_the_previous_export(tmp_path, monkeypatch):
    import os

    from nestling.export import pipeline

    out, tmp = tmp_path / "out", tmp_path / "out.tmp-x"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    tmp.mkdir()
    (tmp / "manifest.json").write_text("new")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == tmp:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", failing_replace)
    with pytest.raises(OSError):
        pipeline._publish(tmp, out)
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-x"]
    monkeypatch.setattr(pipeline.os, "replace", real_replace)
    pipeline._publish(tmp, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
