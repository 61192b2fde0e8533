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
    monkeypatch.setattr(
        pipeline_mod,
        "run_distill",
        lambda cfg, **kw: {"students": {n: trained[n] for n in cfg.student_names()}},
    )

    def fake_compress(cfg):
        calls["compress"].append((cfg.source, cfg.keep_layers, cfg.intermediate_size))
        calls.setdefault("recover_minutes", []).append(cfg.recover_minutes)
        calls.setdefault("recover_steps", []).append(cfg.recover_steps)
        calls.setdefault("precision", []).append(cfg.precision)
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
    assert calls["eval"] == [["smollm2", "smollm2-c30-w768"]]  # the trim only with --export-sources
    assert [p.parent.name for p in calls["export"]] == ["smollm2-c30-w768"]
    assert calls["timed"] == calls["calculator"] == ["smollm2-c30-w768"]


def test_named_compact_students_and_exported_sources(tmp_path, monkeypatch):
    calls = _stub_stages(tmp_path, monkeypatch)
    cfg = run_mod.RunConfig(
        out=str(tmp_path), students=["tiny", "gguf:smollm2"], compress=["smollm2:18"], export_sources=True
    )
    run_mod.run(cfg)
    assert calls["compress"] == [("smollm2", 18, None)]
    assert [p.parent.name for p in calls["export"]] == ["tiny", "smollm2", "smollm2-c18", "smollm2-trim"]


def test_a_compact_recipe_with_steps_runs_them_whole_under_its_own_name(tmp_path, monkeypatch):
    """SOURCE:LAYERS:WIDTH:STEPS: the budget's recovery share does not cut it, and its directory is not the
    budgeted shape's, beside which it runs."""
    calls = _stub_stages(tmp_path, monkeypatch)
    run_mod.run(run_mod.RunConfig(out=str(tmp_path), compress=["smollm2:25:256:600", "smollm2:25:256"]))
    assert calls["compress"] == [("smollm2", 25, 256)] * 2
    assert calls["recover_steps"][0] == 600 and calls["recover_minutes"][0] == 0
    assert calls["recover_minutes"][1] > 0
    assert [p.parent.name for p in calls["export"]] == ["smollm2-c25-w256-r600", "smollm2-c25-w256"]


def test_no_compact_student_without_its_source_or_when_told(tmp_path, monkeypatch):
    calls = _stub_stages(tmp_path, monkeypatch)
    run_mod.run(run_mod.RunConfig(out=str(tmp_path), compress=["none"]))
    assert calls["compress"] == [] and calls["timed"] == ["smollm2"]
    assert run_mod.RunConfig(students=["tiny"]).compress == []  # the default applies only if smollm2 trains


@pytest.mark.parametrize(
    "item",
    ["smollm2", "smollm2:x", ":18", "smollm2:1", "smollm2:30:0", "smollm2:30:256:0", "smollm2:3:4:5:6"],
)
def test_a_bad_compress_item_is_one_line(item):
    with pytest.raises(NestlingError, match=r"--compress .*SOURCE:LAYERS"):
        run_mod.RunConfig(compress=[item])


def test_a_compress_source_that_is_not_a_student_is_refused_before_any_work():
    with pytest.raises(NestlingError, match=r"--compress 'big:18': 'big' is not one of the students"):
        run_mod.RunConfig(compress=["big:18"])


@pytest.mark.parametrize(
    ("kw", "teacher_seconds", "train_minutes", "recover_minutes"),
    [
        ({}, 360.0, 4.5, 4.5),  # the default: 30 minutes
        ({"budget_minutes": 60, "students": ["tiny", "gguf:smollm2"]}, 720.0, 4.5, 9.0),  # split by student
        ({"budget_seconds": 100.0, "train_minutes": 2.5}, 100.0, 2.5, 4.5),  # the user's own budgets stand
        ({"budget_minutes": 0}, None, 0.0, 0.0),  # no budget: every stage runs its full recipe
        ({"adaptive": False}, None, 4.5, 4.5),  # flat sampling has no budget to cut
    ],
)
def test_the_budget_is_shared_among_the_stages_that_can_stop_early(
    tmp_path, monkeypatch, kw, teacher_seconds, train_minutes, recover_minutes
):
    calls = _stub_stages(tmp_path, monkeypatch)
    cfg = run_mod.RunConfig(out=str(tmp_path), **kw)
    assert cfg.budget_seconds == teacher_seconds and cfg.train_minutes == train_minutes
    dcfg = run_mod.DistillConfig(out=cfg.out, **run_mod._overrides(cfg, run_mod.DistillConfig))
    from nestling.distill.pipeline import train_config

    assert train_config(dcfg, "gguf:smollm2").max_minutes == train_minutes  # reaches each student's training
    run_mod.run(cfg)
    assert calls["recover_minutes"] == [recover_minutes]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_run_precision_reaches_the_recovery(tmp_path, monkeypatch, precision):
    """--precision fp32 (a CPU without bf16, or a check of one) holds for the compact student's recovery too,
    not only for the students' training."""
    calls = _stub_stages(tmp_path, monkeypatch)
    run_mod.run(run_mod.RunConfig(out=str(tmp_path), precision=precision))
    assert calls["precision"] == [precision]


def test_a_negative_budget_is_one_line():
    with pytest.raises(NestlingError, match="--budget-minutes"):
        run_mod.RunConfig(budget_minutes=-1)
