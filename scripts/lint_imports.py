"""Check the import contracts (pyproject's [tool.importlinter]) on this checkout:

    python3 scripts/lint_imports.py

A bare `lint-imports` cannot: it reads packages from the file system, where nestling.distill, nestling.export
and nestling.serve are ../distill, ../export and ../serve (pyproject's package-dir mapping), so it reports
"module nestling.export does not exist". This lays the package out as installed, in a temporary folder, and
runs lint-imports there with the checkout's contracts. tests/test_layers.py runs the same function.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", "*.gguf")


def package_view(tree: Path, dest: Path) -> Path:
    """The installed package's layout (pyproject's package-dir mapping applied), as a folder import-linter can
    walk."""
    mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.copytree(tree / "nestling", dest / "nestling", ignore=SKIP)
    for name, folder in mapping.items():
        shutil.copytree(tree / folder, dest / Path(*name.split(".")), ignore=SKIP)
    return dest


def lint_imports(tree: Path, tmp: Path) -> subprocess.CompletedProcess:
    """lint-imports on `tree`'s package view, built under `tmp`; its output is in stdout."""
    exe = shutil.which("lint-imports")
    if exe is None:
        raise SystemExit("import-linter missing: pip install -e .[dev]")
    # import-linter puts its working directory first on sys.path: run it in the view, with the contracts.
    view = package_view(tree, tmp / "view")
    cmd = [exe, "--no-cache", str(tree / "pyproject.toml")]
    return subprocess.run(cmd, cwd=view, capture_output=True, text=True, timeout=120)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nestling-layers-") as tmp:
        proc = lint_imports(ROOT, Path(tmp))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
