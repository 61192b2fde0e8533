"""Check the import contracts (pyproject's [tool.importlinter]) on a tree:

    python3 scripts/lint_imports.py        # this checkout; the same as a bare `lint-imports` at its root

The repository root is the package (pyproject: package-dir nestling = "."), so at the root a bare
`lint-imports` walks the installed tree. A copy of the tree elsewhere (tests/test_layers.py plants a forbidden
import in one) is not what `import nestling` finds, so this lays the copy out as a `nestling/` folder in a
temporary directory and runs lint-imports there, where its working directory comes first on sys.path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", "*.gguf")


def package_view(tree: Path, dest: Path) -> Path:
    """`tree` as a `nestling/` folder under `dest`, which import-linter finds before the installed package."""
    shutil.copytree(tree, dest / "nestling", ignore=SKIP)
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
