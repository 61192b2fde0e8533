"""`serve` runs without torch, transformers or optimum: a fresh interpreter imports the runtime, the server
and the engines, loads reasoners (a scripted fake and the real GGUF and ONNX exports) and answers, and none of
those modules was ever imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum")

PROGRAM = r"""
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
from nestling.serve import Reasoner
import nestling.serve.runtime, nestling.serve.app, nestling.serve.engines
import nestling.serve.settings, nestling.serve.cli
from nestling.serve.app import create_app
from nestling.serve.settings import Settings
from serve_fakes import make_fake_export, register_fake

register_fake()
out = {{"fake": Reasoner.load(make_fake_export({tmp!r})).ask("What is 2 + 3?").answer}}
for kind in {kinds!r}:
    with Reasoner.load({export!r}, engine=kind) as r:
        out[kind] = r.ask("What is 2 + 3?", max_tokens=16).latency.completion_tokens
app = create_app(Settings(model_dir={export!r}))
out["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(json.dumps(out))
"""


def run_isolated(tmp_path: Path, export: Path | None) -> dict:
    code = PROGRAM.format(
        root=str(ROOT),
        tests=str(ROOT / "tests"),
        tmp=str(tmp_path),
        export=str(export or tmp_path / "exports" / "tiny"),
        kinds=["gguf", "onnx"] if export else [],
        heavy=HEAVY,
    )
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_serve_with_a_fake_engine_imports_no_torch(tmp_path):
    out = run_isolated(tmp_path, None)
    assert out["fake"] == "5" and out["heavy"] == []


def test_serve_with_real_gguf_and_onnx_engines_imports_no_torch(tiny_export_dir, tmp_path):
    out = run_isolated(tmp_path, tiny_export_dir)
    assert out["heavy"] == []
    assert out["gguf"] > 0 and out["onnx"] > 0
