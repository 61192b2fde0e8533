"""The run report: recommendation rule and the files `nestling run` promises."""

from __future__ import annotations

import json

from nestling import report as nestling_report
from serve_fakes import make_fake_export, register_fake


def _report():
    return {
        "teacher": {"accuracy": 0.50, "params": 134_500_000, "bytes": 98_000_000, "tokens_per_s": 100.0},
        "baseline": {"accuracy": 0.08},
        "students": {
            "tiny": {"accuracy": 0.52, "params": 3_400_000, "bytes": 14_000_000, "tokens_per_s": 900.0}
        },
        "exports": {
            "tiny-gguf-f16": {
                "student": "tiny",
                "accuracy": 0.52,
                "params": 3_400_000,
                "bytes": 7_000_000,
                "tokens_per_s": 5000.0,
            },
            "tiny-gguf-q8_0": {
                "student": "tiny",
                "accuracy": 0.51,
                "params": 3_400_000,
                "bytes": 4_000_000,
                "tokens_per_s": 6000.0,
            },
            "tiny-gguf-q4_k_m": {
                "student": "tiny",
                "accuracy": 0.45,
                "params": 3_400_000,
                "bytes": 2_500_000,
                "tokens_per_s": 7000.0,
            },
        },
    }


def test_recommend_is_fastest_within_tolerance():
    exports = _report()["exports"]
    assert nestling_report.recommend(exports, tolerance=0.02) == "tiny-gguf-q8_0"
    assert nestling_report.recommend(exports, tolerance=0.10) == "tiny-gguf-q4_k_m"
    assert nestling_report.recommend(exports, tolerance=0.0) == "tiny-gguf-f16"
    assert nestling_report.recommend({}, tolerance=0.02) is None


def test_recommend_names_only_what_serve_would_load():
    # The report and `nestling serve EXPORT_DIR` must not disagree: a variant that is not its directory's
    # default (export.pipeline.choose_default) is never recommended, however fast.
    exports = _report()["exports"]
    for name, e in exports.items():
        e["default"] = name == "tiny-gguf-f16"
    assert nestling_report.recommend(exports, tolerance=0.10) == "tiny-gguf-f16"
    exports["tiny-gguf-f16"]["default"], exports["tiny-gguf-q8_0"]["default"] = False, True
    assert nestling_report.recommend(exports, tolerance=0.10) == "tiny-gguf-q8_0"


def test_write_report_writes_json_md_png(tmp_path):
    out = nestling_report.write_report(tmp_path, _report(), tolerance=0.02)
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"teacher", "baseline", "students", "exports", "recommended"} <= set(data)
    assert data["recommended"] == out["recommended"] == "tiny-gguf-q8_0"
    md = (tmp_path / "report.md").read_text()
    assert "tiny-gguf-q8_0" in md and "8.0%" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recommend_prefers_quicker_answers_over_decode_speed():
    exports = _report()["exports"]
    # f16 decodes slowest but answers quickest (a shorter explanation, say): what a user waits for decides.
    exports["tiny-gguf-f16"]["answer_s"] = {"explain": 0.010, "answer": 0.002}
    exports["tiny-gguf-q8_0"]["answer_s"] = {"explain": 0.030, "answer": 0.003}
    assert nestling_report.recommend(exports, tolerance=0.02) == "tiny-gguf-f16"
    # an untimed export ranks after every timed one
    assert nestling_report.recommend(exports, tolerance=0.10) == "tiny-gguf-f16"


def test_answers_are_timed_per_variant_in_both_modes_and_cached(tmp_path):
    from nestling.latency import measure_export

    loaded = register_fake()
    export = make_fake_export(tmp_path)
    questions = ["What is 2 + 3?", "What is 9 * 8?"]
    cache = tmp_path / "latency" / "tiny.json"
    timed = measure_export(export, questions, cache=cache)
    assert set(timed) == {"fake-a", "fake-b"}
    for modes in timed.values():
        assert set(modes) == {"explain", "answer"}
        assert modes["explain"]["n"] == 2 and modes["explain"]["median_s"] > 0
    calls = sum(e.calls for e in loaded)
    assert calls == 2 * 2 * (1 + len(questions))  # variants x modes x (warm-up + questions)
    assert measure_export(export, questions, cache=cache) == timed
    assert sum(e.calls for e in loaded) == calls  # served from the cache: nothing re-timed
    measure_export(export, questions[:1], cache=cache)
    assert sum(e.calls for e in loaded) > calls  # other questions: timed again


def test_exports_are_scored_on_the_questions_they_answer_and_reported_so(tmp_path):
    from nestling.latency import measure_export

    register_fake()
    export = make_fake_export(tmp_path / "run" / "exports")
    questions = ["What is 2 + 3?", "What is 9 * 8?", "What is 1 + 1?"]
    seen: list[tuple[int, str]] = []

    def score(i: int, text: str) -> bool:
        seen.append((i, text))
        return i != 1

    cache = tmp_path / "run" / "latency" / "tiny.json"
    timed = measure_export(export, questions, cache=cache, score=score)
    for modes in timed.values():
        for m in modes.values():
            assert (m["n"], m["correct"]) == (3, 2) and abs(m["accuracy"] - 2 / 3) < 1e-9
    assert sorted({i for i, _ in seen}) == [0, 1, 2] and all(isinstance(t, str) for _, t in seen)
    entries = nestling_report._export_entries(tmp_path / "run", export)
    for e in entries.values():  # the timed pass decides the reported accuracy, not the parity prompts
        assert e["n"] == 3 and abs(e["accuracy"] - 2 / 3) < 1e-9 and e["accuracy_answer_only"] is not None
        assert e["accuracy_ci"][0] < 2 / 3 < e["accuracy_ci"][1]


def test_the_default_variant_is_measured_with_the_calculator_and_reported_beside_its_greedy_figure(tmp_path):
    from nestling.core.explain import answers_match
    from nestling.core.rundir import RunDir
    from nestling.latency import measure_calculator, measure_export

    loaded = register_fake()
    run = tmp_path / "run"
    export = make_fake_export(run / "exports")
    rows = [("slip: 9 * 8 + 3?", "75"), ("What is 2 + 3?", "5"), ("wrong: 9 * 8?", "72")]
    questions = [q for q, _ in rows]

    def score(i: int, text: str) -> bool:
        from nestling.core.explain import extract_answer

        return answers_match(extract_answer(text), rows[i][1])

    measure_export(export, questions, cache=RunDir(run).latency("tiny"), score=score)
    calc = measure_calculator(export, questions, cache=RunDir(run).calculator("tiny"), score=score)
    assert calc["variant"] == "fake-a"  # the manifest's default: what `nestling serve` loads
    assert (calc["n"], calc["correct"], calc["answers_corrected"]) == (3, 3, 2)
    assert abs(calc["corrections_per_answer"] - 2 / 3) < 1e-9
    calls = sum(e.calls for e in loaded)
    assert measure_calculator(export, questions, cache=RunDir(run).calculator("tiny"), score=score) == calc
    assert sum(e.calls for e in loaded) == calls  # cached

    entries = nestling_report._export_entries(run, export)
    c = entries["tiny-fake-a"]["calculator"]
    assert c["accuracy"] == 1.0 and entries["tiny-fake-a"]["accuracy"] < 1.0  # greedy slips on two of three
    assert "calculator" not in entries["tiny-fake-b"]
    md = nestling_report._report_markdown({"exports": entries, "tolerance": 0.02})
    assert "## With the calculator in the loop" in md
    assert "| tiny-fake-a | 100.0% |" in md


def test_the_report_and_serve_pick_a_variant_by_one_rule(tmp_path):
    """export.choose_default (what `nestling serve` loads) and report.recommend call one rule: on an export
    whose manifest the run reads back, the report recommends the served variant, and with every variant
    competing it picks that same one (the f16 scores what PyTorch scores, so both references agree)."""
    from nestling.export.pipeline import choose_default

    from nestling.core.manifest import write_manifest

    def v(acc, top1, speed):
        return {"engine": "gguf", "path": "gguf/m.gguf", "accuracy": acc, "accuracy_delta": acc - 0.50,
                "parity": {"teacher_forced_top1": top1}, "tokens_per_s": speed}  # fmt: skip

    variants = {
        "gguf-f16": v(0.50, 1.00, 5000.0),
        "gguf-q8_0": v(0.49, 0.99, 6000.0),
        "gguf-q4_k_m": v(0.45, 0.97, 7000.0),  # fastest, but 5 points off
        "gguf-q3": v(0.50, 0.80, 9000.0),  # fastest and accurate, but agrees too rarely teacher-forced
    }
    for tol, want in ((0.02, "gguf-q8_0"), (0.10, "gguf-q4_k_m"), (0.0, "gguf-f16")):
        default = choose_default(variants, tol)
        assert default == want
        export = tmp_path / str(tol) / "exports" / "tiny"
        export.mkdir(parents=True)
        write_manifest(export, stage="export", variants=variants, default_variant=default)
        entries = nestling_report._export_entries(tmp_path / str(tol), export)
        assert nestling_report.recommend(entries, tol) == f"tiny-{default}"
        competing = {k: {**e, "default": True} for k, e in entries.items()}
        assert nestling_report.recommend(competing, tol) == f"tiny-{default}"


def test_an_export_timed_on_the_first_questions_is_compared_with_its_student_on_those():
    student = {"accuracy": 0.5, "n": 4, "correct": "1100"}
    export = {"accuracy": 0.5, "n": 2}
    nestling_report._delta_vs_pytorch(export, student)
    assert export["pytorch_accuracy_same_questions"] == 1.0 and export["accuracy_delta_vs_pytorch"] == -0.5
    whole = {"accuracy": 0.75, "n": 4}
    nestling_report._delta_vs_pytorch(whole, {"accuracy": 0.5, "n": 4})  # no record: only the same split
    assert whole["accuracy_delta_vs_pytorch"] == 0.25
    other = {"accuracy": 0.5, "n": 3}
    nestling_report._delta_vs_pytorch(other, {"accuracy": 0.5, "n": 4})
    assert "accuracy_delta_vs_pytorch" not in other  # different questions are not compared
    md = nestling_report._report_markdown({"tolerance": 0.02, "exports": {"x": {**export, "student": "s"}}})
    assert "| 2 (PyTorch 100.0%) |" in md
