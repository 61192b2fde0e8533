"""The layering the design promises, checked on the import graph by import-linter (pyproject.toml contracts):
the CLI on top, then export, distill, the serve runtime, and the shared core as the floor; neither of the last
two imports the training stack. One path per module: no symlinks; the repository root is the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "scripts"))
from lint_imports import SKIP, lint_imports  # noqa: E402  (the same check as `python3 scripts/lint_imports.py`)


def _copy_tree(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=SKIP)
    return dest


def test_the_contracts_hold(tmp_path):
    proc = lint_imports(ROOT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_one_path_per_module():
    # Symlinks in git break checkouts without them (Windows) and show every file twice to grep and IDEs.
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True).stdout
    links = [line.split("\t")[-1] for line in staged.splitlines() if line.startswith("120000")]
    assert links == []
    import nestling.serve.runtime

    import nestling.core.explain

    assert Path(nestling.serve.runtime.__file__).parent == ROOT / "serve"
    assert Path(nestling.core.explain.__file__).parent == ROOT / "core"


def test_a_core_module_importing_distill_breaks_the_build(tmp_path):
    # A copy of the tree with forbidden imports: the checker reads the files, so it must see them.
    tree = _copy_tree(tmp_path / "tree")
    bad = tree / "core" / "explain.py"
    leak = "\n\ndef _leak():\n    import torch\n    from nestling.distill import tasks\n"
    bad.write_text(bad.read_text() + leak)
    proc = lint_imports(tree, tmp_path)
    assert proc.returncode != 0
    assert "nestling.core.explain -> nestling.distill.tasks" in proc.stdout
    assert "nestling.core.explain -> torch" in proc.stdout


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
    for module in ("core/explain.py", "serve/runtime.py", "serve/static/index.html", "distill/train.py"):
        assert f"nestling/{module}" in names
