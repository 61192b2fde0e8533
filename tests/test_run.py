"""`nestling run` end to end on the bundled teacher with a tiny budget: the files and keys it promises, and a
re-run that redoes nothing."""

from __future__ import annotations

import json

import pytest
from nestling import cli as nestling_cli

pytestmark = pytest.mark.slow


def test_run_writes_the_report_and_a_rerun_skips_every_stage(tmp_path):
    out = tmp_path / "run"
    argv = [
        "run",
        "--out",
        str(out),
        "--n",
        "30",
        "--samples",
        "2",
        "--students",
        "tiny",
        "--steps",
        "30",
        "--eval-limit",
        "6",
        "--parity-prompts",
        "4",
        "--threads",
        "1",
    ]
    assert nestling_cli.main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    assert {"teacher", "baseline", "students", "exports", "recommended"} <= set(report)
    assert set(report["students"]) == {"tiny"}
    variants = {"onnx-fp32", "onnx-int8", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"}
    assert set(report["exports"]) == {f"tiny-{v}" for v in variants}
    for entry in [report["teacher"], report["students"]["tiny"], *report["exports"].values()]:
        assert {"accuracy", "params", "bytes", "tokens_per_s"} <= set(entry)
        assert entry["params"] > 0 and entry["bytes"] > 0 and entry["tokens_per_s"] > 0
    assert all(e["student"] == "tiny" for e in report["exports"].values())
    assert report["recommended"] in report["exports"]
    rec = report["exports"][report["recommended"]]  # what `nestling serve` of its directory loads
    manifest = json.loads((out / "exports" / rec["student"] / "manifest.json").read_text())
    assert rec["default"] and manifest["default_variant"] == rec["variant"]
    assert report["students"]["tiny"]["params"] * 20 <= report["teacher"]["params"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "Recommended artifact" in (out / "report.md").read_text()

    stage_manifests = sorted(out.glob("**/manifest.json"))
    before = {p: p.read_text() for p in stage_manifests}
    assert nestling_cli.main(argv) == 0
    assert {p: p.read_text() for p in stage_manifests} == before  # nothing was redone
