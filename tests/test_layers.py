"""The layering the design promises, checked on the import graph by import-linter (pyproject.toml contracts):
the CLI on top, then export, distill, and serve as the floor, which never imports the training stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or pytest.fail("import-linter missing: pip install -e .[dev]")
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_a_serve_module_importing_distill_breaks_the_build(tmp_path):
    # A copy of the tree with forbidden imports: the checker reads the files, so it must see them.
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns(".git", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, tree, ignore=skip, symlinks=True)
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
