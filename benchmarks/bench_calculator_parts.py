"""Where does the calculator help, and how do the explanations look? Accuracy by task and steps per
explanation, greedy and with the calculator, for a run's export and its teacher on the same held-out rows.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_calculator_parts.py --run runs/default \
        --export runs/default/exports/smollm2-c30-w768 --teacher gguf:smollm2 \
        --out benchmarks/results/default_run_calculator/parts.json

Each entry: for every task of the mix (and every count of steps the explanations had), [questions, right]. The
teacher is served as bench_serve_verify serves it: the same runtime and checks, its own chat prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]


def parts(r, rows: list[dict], max_tokens: int, **kw) -> dict[str, list[int]]:
    """[questions, right] per (task, steps in the explanation)."""
    from nestling.core.explain import answers_match

    seen: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for row in rows:
        a = r.ask(row["question"], max_tokens=max_tokens, **kw)
        key = f"{row['task']} | {len(a.steps)} step(s)"
        seen[key] += 1
        right[key] += answers_match(a.answer, str(row["gold"]))
    return {k: [seen[k], right[k]] for k in sorted(seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the run directory (its held-out questions)")
    ap.add_argument("--export", type=Path, required=True, help="an export of the run (its default GGUF)")
    ap.add_argument("--teacher", help="also the teacher, e.g. gguf:smollm2")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calculator_parts.json")
    args = ap.parse_args()

    from bench_serve_verify import cpu, teacher_reasoner
    from nestling.serve.runtime import Reasoner

    from nestling.core.manifest import atomic_write_json
    from nestling.core.rundir import RunDir

    rows = RunDir(args.run).heldout()[: args.n]
    out: dict = {"export": str(args.export), "questions": len(rows), "cpu": cpu()}
    with Reasoner.load(args.export, engine="gguf") as r:
        out["variant"] = r.variant
        out["student"] = {"greedy": parts(r, rows, 48), "calculator": parts(r, rows, 48, calculator=True)}
        task = r.task
    if args.teacher:
        with teacher_reasoner(args.teacher, task) as t:
            greedy = parts(t, rows, 256)
            out["teacher"] = {"greedy": greedy, "calculator": parts(t, rows, 256, calculator=True)}
    atomic_write_json(args.out, out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
