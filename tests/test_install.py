"""Each extra on its own, installed from the lock into an empty venv as a user would: `[serve]` alone answers
from an ONNX export and never installs torch; `[train]` alone runs `nestling train --help`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _venv(tmp: Path, extra: str, *also: str) -> Path:
    venv = tmp / f"venv-{extra}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--progress-bar", "off"]
    lock = ["-c", str(ROOT / "scripts" / "lock.txt")]
    proc = subprocess.run(
        [*pip, *lock, *also, f"{ROOT}[{extra}]"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def _installed(venv: Path) -> set[str]:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
    ).stdout
    return {p["name"].lower().replace("_", "-") for p in json.loads(out)}


# Bytes every installed distribution's RECORD lists, pip and setuptools (the venv's own) apart:
# what the extra adds.
_ADDED_BYTES = """
import importlib.metadata as md, os
print(sum(os.path.getsize(d.locate_file(f)) for d in md.distributions()
          if d.metadata["Name"].lower() not in {"pip", "setuptools", "nestling"}
          for f in d.files or [] if os.path.isfile(d.locate_file(f))))
"""


def test_serve_alone_answers_from_an_onnx_export(tmp_path, tiny_export_dir):
    venv = _venv(tmp_path, "serve")
    assert not _installed(venv) & {"torch", "transformers", "optimum", "llama-cpp-python", "rich"}
    added = int(
        subprocess.run([venv / "bin" / "python", "-c", _ADDED_BYTES], capture_output=True, text=True).stdout
    )
    assert added <= 200e6, f"[serve] adds {added / 1e6:.1f} MB of site-packages, over the 200 MB target"
    nestling = str(venv / "bin" / "nestling")
    assert subprocess.run([nestling, "--help"], capture_output=True, timeout=60).returncode == 0
    proc = subprocess.run(
        [nestling, "ask", str(tiny_export_dir), "What is 2 + 3?", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Answer:" in proc.stdout and "onnx" in proc.stdout
    # A GGUF variant asked for by name says which extra brings llama.cpp, in one line.
    proc = subprocess.run(
        [nestling, "ask", str(tiny_export_dir), "What is 2 + 3?", "--engine", "gguf"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "pip install 'nestling[gguf]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_train_alone_runs_train_help(tmp_path):
    venv = _venv(tmp_path, "train", "torch==2.13.0")
    assert not _installed(venv) & {"fastapi", "onnxruntime", "uvicorn"}
    proc = subprocess.run([str(venv / "bin" / "nestling"), "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--student" in proc.stdout
