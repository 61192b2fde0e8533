"""The layering the design promises, checked on the import graph by import-linter (pyproject.toml contracts):
the CLI on top, then export, distill, and serve as the floor, which never imports the training stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or pytest.fail("import-linter missing: pip install -e .[dev]")
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def _copy_tree(dest: Path) -> Path:
    skip = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", "*.gguf")
    shutil.copytree(ROOT, dest, ignore=skip, symlinks=True)
    return dest


def test_the_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_a_serve_module_importing_distill_breaks_the_build(tmp_path):
    # A copy of the tree with forbidden imports: the checker reads the files, so it must see them.
    tree = _copy_tree(tmp_path / "tree")
    bad = tree / "serve" / "explain.py"
    leak = "\n\ndef _leak():\n    import torch\n    from nestling.distill import tasks\n"
    bad.write_text(bad.read_text() + leak)
    # The copy's nestling/ (its symlinks point into the copy) must shadow the installed one.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.argv[1:] = ['--no-cache']; "
        "from importlinter.cli import lint_imports_command; lint_imports_command()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tree)], cwd=tree, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "nestling.serve.explain -> nestling.distill.tasks" in proc.stdout
    assert "nestling.serve.explain -> torch" in proc.stdout


def test_the_wheel_installs_one_top_level_name(tmp_path):
    # `pip install nestling[serve]` must not drop modules called `serve`, `export` or `distill` into a user's
    # site-packages, and the links under nestling/ must become real files. Built from a copy: setuptools
    # writes build/ into the source tree.
    src = _copy_tree(tmp_path / "src")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (src / "dist").glob("nestling-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"nestling", dist_info}
    for module in ("serve/runtime.py", "serve/static/index.html", "distill/train.py", "export/gguf.py"):
        assert f"nestling/{module}" in names
