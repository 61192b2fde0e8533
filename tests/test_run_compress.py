"""`nestling run --compress SOURCE:LAYERS[:WIDTH]`: the compact student and its source's lossless trim
join the run's students and are evaluated beside the trained ones; the compact one is exported, timed and
scored like them (its source and trim only with --export-sources). Stages are stand-ins here; each is tested
on its own (test_compress, test_evaluate, test_export_cli, test_report)."""

from __future__ import annotations

from pathlib import Path

import pytest

import nestling.run as run_mod
from nestling.core.errors import NestlingError


def _stub_stages(tmp_path, monkeypatch) -> dict[str, list]:
    import nestling.distill.compress as compress_mod
    import nestling.distill.evaluate as evaluate_mod
    import nestling.distill.pipeline as pipeline_mod
    import nestling.export.pipeline as export_mod

    calls: dict[str, list] = {"compress": [], "eval": [], "export": [], "timed": [], "calculator": []}
    students = tmp_path / "students"
    trained = {"tiny": students / "tiny" / "model", "smollm2": students / "smollm2" / "model"}
    monkeypatch.setattr(pipeline_mod, "run_distill", lambda cfg, **kw: {"students": dict(trained)})

    def fake_compress(cfg):
        calls["compress"].append((cfg.source, cfg.keep_layers, cfg.intermediate_size))
        calls.setdefault("recover_steps", []).append(cfg.recover_steps)
        return students / str(cfg.name)

    def fake_measure(out, questions, **kw):
        assert kw["score"](0, "Answer: 4") and not kw["score"](0, "Answer: 5")  # scored like eval
        calls["timed"].append(out.name)

    rows = [
        {
            "id": "q1",
            "question": "What is 2 + 2?",
            "gold": "4",
            "task": "rg:basic_arithmetic",
            "split": "heldout",
        }
    ]
    monkeypatch.setattr(compress_mod, "compress", fake_compress)
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda cfg: calls["eval"].append(cfg.students))
    monkeypatch.setattr(export_mod, "export_student", lambda cfg: calls["export"].append(Path(cfg.student)))
    monkeypatch.setattr(run_mod, "measure_export", fake_measure)
    monkeypatch.setattr(
        run_mod, "measure_calculator", lambda out, questions, **kw: calls["calculator"].append(out.name)
    )
    monkeypatch.setattr(run_mod, "_heldout_rows", lambda run_dir, n: rows)
    monkeypatch.setattr(run_mod, "collect_report", lambda run_dir: {})
    monkeypatch.setattr(run_mod, "write_report", lambda run_dir, report, tol: {"paths": {}})
    return calls


def test_the_default_compacts_smollm2_and_deploys_the_compact_student(tmp_path, monkeypatch):
    calls = _stub_stages(tmp_path, monkeypatch)
    run_mod.run(run_mod.RunConfig(out=str(tmp_path)))
    assert calls["compress"] == [("smollm2", 30, 768)]
    assert calls["eval"] == [["tiny", "smollm2", "smollm2-c30-w768", "smollm2-trim"]]
    assert [p.parent.name for p in calls["export"]] == ["tiny", "smollm2-c30-w768"]
    assert calls["timed"] == calls["calculator"] == ["tiny", "smollm2-c30-w768"]


def test_named_compact_students_and_exported_sources(tmp_path, monkeypatch):
    calls = _stub_stages(tmp_path, monkeypatch)
    cfg = run_mod.RunConfig(out=str(tmp_path), compress=["smollm2:18"], export_sources=True)
    run_mod.run(cfg)
    assert calls["compress"] == [("smollm2", 18, None)]
    assert [p.parent.name for p in calls["export"]] == ["tiny", "smollm2", "smollm2-c18", "smollm2-trim"]


def test_no_compact_student_without_its_source_or_when_told(tmp_path, monkeypatch):
    calls = _stub_stages(tmp_path, monkeypatch)
    run_mod.run(run_mod.RunConfig(out=str(tmp_path), compress=["none"]))
    assert calls["compress"] == [] and calls["timed"] == ["tiny", "smollm2"]
    assert run_mod.RunConfig(students=["tiny"]).compress == []  # the default applies only if smollm2 trains


@pytest.mark.parametrize(
    "item", ["smollm2", "smollm2:x", ":18", "smollm2:1", "smollm2:30:0", "smollm2:3:4:5"]
)
def test_a_bad_compress_item_is_one_line(item):
    with pytest.raises(NestlingError, match=r"--compress .*SOURCE:LAYERS"):
        run_mod.RunConfig(compress=[item])


def test_a_compress_source_that_is_not_a_student_is_refused_before_any_work():
    with pytest.raises(NestlingError, match=r"--compress 'big:18': 'big' is not one of the students"):
        run_mod.RunConfig(compress=["big:18"])


@pytest.mark.parametrize(
    ("seconds_per_step", "budget", "steps"),
    [(2.13, 30.0, 300), (6.4, 30.0, 101), (30.0, 30.0, 100), (6.4, 0.0, 300), (6.4, 60.0, 202)],
)
def test_the_compact_recovery_is_sized_to_the_budget_by_the_sources_training_speed(
    tmp_path, monkeypatch, seconds_per_step, budget, steps
):
    from nestling.core.manifest import write_manifest

    calls = _stub_stages(tmp_path, monkeypatch)
    metrics = {"steps": 120, "train_seconds": 120 * seconds_per_step}
    write_manifest(tmp_path / "students" / "smollm2", stage="train", config={}, metrics=metrics)
    run_mod.run(run_mod.RunConfig(out=str(tmp_path), budget_minutes=budget))
    assert calls["recover_steps"] == [
        steps
    ]  # 300 at this machine's 2.13 s/step; fewer where training is slow


def test_a_negative_budget_is_one_line():
    with pytest.raises(NestlingError, match="--budget-minutes"):
        run_mod.RunConfig(budget_minutes=-1)
