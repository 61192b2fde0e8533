"""The grounding checker as a classifier: precision and recall of "complete" on labelled rationales.

    python3 benchmarks/bench_grounding.py                       # the test suite's labelled set, 5 seeds
    python3 benchmarks/bench_grounding.py --traces runs/default/traces/traces.jsonl   # + real teacher records

The labelled set (tests/grounding_set.py) is built from the shapes models write explanations in and from
controlled corruptions of correct chains (an operand swapped, an operator changed, a result from nowhere, an
answer that differs from the last result, a false step), and of place-value decomposed chains (a wrong part,
parts that do not sum to the stated number, a part left out, a recombination that skips a part's product).
Word problems come in two families: "word", the templates the operation cues were developed on, and
"word_new", templates written afterwards and measured as they came. Precision: of the chains called
complete, the share that are correct; recall: of the correct chains, the share called complete. With
--traces, the records of a real traces run are scored too (no labels: the share of right-answer records whose
explanation is complete, and of those with an ungrounded step). Also the checker's speed, and the time of a
10,000-step input (bounded by construction). Writes benchmarks/results/grounding.json with the CPU model
and whether it has AVX-512.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def labelled(seeds: list[int]) -> dict:
    from grounding_set import labelled_set, score

    runs, t_items, t_secs = [], 0, 0.0
    for seed in seeds:
        items = labelled_set(seed)
        t0 = time.perf_counter()
        s = score(items)
        t_secs += time.perf_counter() - t0
        t_items += len(items)
        runs.append(s)
    tp, fp = sum(s["true_complete"] for s in runs), sum(s["false_complete"] for s in runs)
    positives = sum(s["correct_chains"] for s in runs)
    corrupted = sum(s["corrupted_chains"] for s in runs)
    return {
        "seeds": seeds,
        "items": sum(s["items"] for s in runs),
        "correct_chains": positives,
        "corrupted_chains": corrupted,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / positives, 4),
        "corrupted_called_complete": round(fp / corrupted, 4),
        "per_seed": [{k: s[k] for k in ("precision", "recall", "corrupted_called_complete")} for s in runs],
        "by_kind_seed0": runs[0]["by_kind"],
        "blind_spots": runs[0]["blind_spots"],
        "misses_seed0": runs[0]["misses"],
        "explanations_per_s": round(t_items / t_secs, 1),
    }


def real_traces(path: Path) -> dict:
    """Unlabelled real records: how many right-answer explanations are complete, ungrounded, false."""
    from nestling.distill.filters import record_steps

    from nestling.core.explain import ground

    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    right = [r for r in rows if r.get("correct") and r.get("question")]
    complete = ungrounded = false = 0
    examples = []
    for r in right:
        steps, _ = record_steps(r, r.get("task"))
        e = ground(r["question"], steps, r.get("answer"), r.get("task"))
        complete += e.complete
        ungrounded += any(s.status == "ungrounded" for s in e.steps)
        false += any(s.status == "false" for s in e.steps)
        if not e.complete and len(examples) < 10:
            examples.append({"question": r["question"], "rationale": r.get("rationale"), "why": e.reason})
    n = len(right) or 1
    return {
        "path": str(path),
        "records": len(rows),
        "right_answer_records": len(right),
        "complete": round(complete / n, 4),
        "with_ungrounded_step": round(ungrounded / n, 4),
        "with_false_step": round(false / n, 4),
        "incomplete_examples": examples,
    }


def bounded() -> dict:
    from nestling.core.explain import MAX_CHECKED_STEPS, MAX_STEP_CHARS, ground

    nested = "(" * 150 + "1 + 1" + ")" * 150 + " = 2"  # within the step limit: parsed
    t0 = time.perf_counter()
    e = ground("Calculate 1 + 1.", [nested] * 10_000, "2")
    return {
        "steps": 10_000,
        "checked": MAX_CHECKED_STEPS,
        "max_step_chars": MAX_STEP_CHARS,
        "seconds": round(time.perf_counter() - t0, 3),
        "complete": e.complete,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--traces", type=Path, help="a traces.jsonl of a real run to score as well")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grounding.json")
    args = ap.parse_args()

    from nestling.distill.accel import cpu_info

    from nestling.core.manifest import atomic_write_json

    out = {"cpu": cpu_info(), "labelled": labelled(args.seeds), "bounded": bounded()}
    real = args.traces or next(iter(sorted(ROOT.glob("benchmarks/results/**/traces.jsonl"))), None)
    out["real_traces"] = real_traces(real) if real else "none committed under benchmarks/results"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    lab = out["labelled"]
    print(
        f"precision {lab['precision']}  recall {lab['recall']}  corrupted called complete "
        f"{lab['corrupted_called_complete']}  ({lab['items']} items, {lab['explanations_per_s']}/s); "
        f"10,000 steps in {out['bounded']['seconds']} s"
    )
    print(f"[bench_grounding] wrote {args.out}")


if __name__ == "__main__":
    main()
