"""What `pip install 'nestling[serve]'` costs: site-packages bytes per distribution and install time, for the
lock as committed and for lock variants side by side (e.g. another onnxruntime), in venvs made without pip so
the figure is what the extra adds.

    python3 benchmarks/bench_install.py --extra serve --variant onnxruntime==1.32.0

Each variant replaces its packages' pins in scripts/lock.txt for that install only. Writes
benchmarks/results/install_serve.json and .png (stacked bars: the largest distributions, the rest as "other").
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Run inside the fresh venv: bytes of every file each installed distribution's RECORD lists.
_SIZES = """
import importlib.metadata as md, json, os
out = {}
for d in md.distributions():
    total = 0
    for f in d.files or []:
        p = d.locate_file(f)
        if os.path.isfile(p):
            total += os.path.getsize(p)
    out[d.metadata["Name"]] = total
print(json.dumps(out))
"""


def constraints(variant: list[str], tmp: Path) -> Path:
    """scripts/lock.txt with each NAME==VERSION of the variant put in place of the lock's pin of NAME."""
    override = {re.split(r"[=<>!~]", v, maxsplit=1)[0].lower(): v for v in variant}
    lines = []
    for line in (ROOT / "scripts" / "lock.txt").read_text().splitlines():
        name = re.split(r"[=<>!~ ]", line, maxsplit=1)[0].lower()
        lines.append(override.pop(name, line))
    path = tmp / "constraints.txt"
    path.write_text("\n".join([*lines, *override.values()]) + "\n")
    return path


def measure(extra: str, variant: list[str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        py = venv / "bin" / "python"
        cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--progress-bar", "off"]
        t0 = time.perf_counter()
        subprocess.run([*cmd, "-c", str(constraints(variant, tmp)), f"{ROOT}[{extra}]"], check=True)
        seconds = time.perf_counter() - t0
        sizes = json.loads(
            subprocess.run([py, "-c", _SIZES], capture_output=True, text=True, check=True).stdout
        )
        ok = subprocess.run([venv / "bin" / "nestling", "--help"], capture_output=True).returncode == 0
    sizes.pop("nestling", None)
    return {
        "variant": variant or ["lock as committed"],
        "install_s": round(seconds, 1),
        "site_packages_mb": round(sum(sizes.values()) / 1e6, 1),
        "nestling_help_ok": ok,
        "by_distribution_mb": {k: round(v / 1e6, 2) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])},
    }


def plot(results: list[dict], path: Path, top: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for r in results:
        names += [n for n in list(r["by_distribution_mb"])[:top] if n not in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [" ".join(r["variant"]) for r in results]
    bottom = [0.0] * len(results)
    for name in [*names, "other"]:
        vals = [
            r["by_distribution_mb"].get(name, 0.0)
            if name != "other"
            else sum(v for n, v in r["by_distribution_mb"].items() if n not in names)
            for r in results
        ]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.axhline(200, color="k", linestyle="--", linewidth=1, label="200 MB target")
    ax.set_ylabel("site-packages, MB")
    ax.set_title("pip install 'nestling[serve]' into an empty venv (no pip)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra", default="serve")
    ap.add_argument("--variant", action="append", default=[], help="NAME==VERSION pins for one more install")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    variants = [[]] + [v.split(",") for v in args.variant]
    results = [measure(args.extra, v) for v in variants]
    out = args.out or RESULTS / f"install_{args.extra}.json"
    from nestling.distill.accel import cpu_info

    out.write_text(json.dumps({**cpu_info(), "extra": args.extra, "results": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    for r in results:
        print(f"{' '.join(r['variant']):>24}: {r['site_packages_mb']:6.1f} MB, {r['install_s']:5.1f} s")


if __name__ == "__main__":
    main()
