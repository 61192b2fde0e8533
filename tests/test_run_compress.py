"""`nestling run --compress SOURCE:LAYERS`: the compact student and its source's lossless trim join the run's
students: evaluated beside the trained ones, exported and timed like them. Stages are stand-ins here; each is
tested on its own (test_compress, test_evaluate, test_export_cli, test_report)."""

from __future__ import annotations

from pathlib import Path

import pytest

import nestling.run as run_mod
from nestling.serve.errors import NestlingError


def test_compact_students_are_evaluated_exported_and_timed(tmp_path, monkeypatch):
    import nestling.distill.compress as compress_mod
    import nestling.distill.evaluate as evaluate_mod
    import nestling.distill.pipeline as pipeline_mod
    import nestling.export.pipeline as export_mod

    calls: dict[str, list] = {"compress": [], "eval": [], "export": [], "timed": []}
    students = tmp_path / "students"
    monkeypatch.setattr(
        pipeline_mod, "run_distill", lambda cfg: {"students": {"smollm2": students / "smollm2" / "model"}}
    )

    def fake_compress(cfg):
        calls["compress"].append((cfg.source, cfg.keep_layers))
        return students / str(cfg.name)

    monkeypatch.setattr(compress_mod, "compress", fake_compress)
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda cfg: calls["eval"].append(cfg.students))
    monkeypatch.setattr(export_mod, "export_student", lambda cfg: calls["export"].append(Path(cfg.student)))
    monkeypatch.setattr(run_mod, "measure_export", lambda out, qs, **kw: calls["timed"].append(out.name))
    monkeypatch.setattr(run_mod, "_heldout_questions", lambda run_dir, n: ["What is 2 + 2?"])
    monkeypatch.setattr(run_mod, "collect_report", lambda run_dir: {})
    monkeypatch.setattr(run_mod, "write_report", lambda run_dir, report, tol: {"paths": {}})

    run_mod.run(run_mod.RunConfig(out=str(tmp_path), students=["gguf:smollm2"], compress=["smollm2:18"]))
    assert calls["compress"] == [("smollm2", 18)]
    assert calls["eval"] == [["smollm2", "smollm2-c18", "smollm2-trim"]]
    assert [p.parent.name for p in calls["export"]] == ["smollm2", "smollm2-c18", "smollm2-trim"]
    assert calls["timed"] == ["smollm2", "smollm2-c18", "smollm2-trim"]


@pytest.mark.parametrize("item", ["smollm2", "smollm2:x", ":18", "smollm2:1"])
def test_a_bad_compress_item_is_one_line(item):
    with pytest.raises(NestlingError, match=r"--compress .*SOURCE:LAYERS"):
        run_mod.RunConfig(compress=[item])
