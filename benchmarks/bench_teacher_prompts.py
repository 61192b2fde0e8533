"""Which worked example makes the bundled teacher write one operation per step, and what the calculator adds.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_teacher_prompts.py \
        --questions runs/default/traces/questions.jsonl --styles closest one -n 40 --samples 4

The teacher (gguf:smollm2) answers the run's TRAINING questions (never held-out ones), half two-term and half
three-term, under each prompt style, through the serving runtime (its chat template over distill.prompts'
messages, the step checks of core.explain):

    one      the one-step example ("Calculate 3 + 4.") for every question: the prompt before multi-step work
    two      a two-step example ("Calculate 6 - 2 * 3.") for every question
    both     the one-step then the two-step example, for every question
    closest  distill.prompts' choice per question: the example with as many numbers, then most words shared

For each: greedy, greedy with the calculator, and --samples at T=0.7 with the calculator. "procedure" counts
answers that are right, written in two or more claims, every step true and grounded, the answer derived:
the rationales a student can learn a procedure from. "covered" is the share of questions with at least one
such sample. Writes benchmarks/results/teacher_prompts.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

from bench_serve_verify import cpu  # noqa: E402

ONE = ("Calculate 3 + 4.", "Step 1: 3 + 4 = 7.\nAnswer: 7")
TWO = ("Calculate 6 - 2 * 3.", "Step 1: 2 * 3 = 6.\nStep 2: 6 - 6 = 0.\nAnswer: 0")


def style_messages(style: str):
    """question -> the teacher's messages under a style (closest: distill.prompts as traces send them)."""
    from nestling.distill import prompts

    if style == "closest":
        return prompts.teacher_messages
    shots = {"one": [ONE], "two": [TWO], "both": [ONE, TWO]}[style]

    def messages(q: str) -> list[dict]:
        m = [{"role": "system", "content": prompts.SYSTEM}]
        for sq, sa in shots:
            m += [{"role": "user", "content": sq}, {"role": "assistant", "content": sa}]
        return [*m, {"role": "user", "content": q.strip()}]

    return messages


def terms(row: dict) -> int:
    return len(re.findall(r"\d+", row["meta"].get("expression") or row["question"]))


def training_rows(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "train"]
    random.Random(0).shuffle(rows)
    return [r for r in rows if terms(r) == 2][: n // 2] + [r for r in rows if terms(r) == 3][: n // 2]


def score(r, rows: list[dict], samples: int, **kw) -> dict:
    from nestling.serve.sampling import SamplingParams

    from nestling.core.explain import answers_match, ground, parse_steps

    tally = {2: [0, 0, 0], 3: [0, 0, 0]}  # right, procedure, samples
    covered, corrections, t0 = 0, 0, time.perf_counter()
    for i, row in enumerate(rows):
        hit = False
        for s in range(samples):
            sampling = {"sampling": SamplingParams(0.7, seed=1000 * i + s)} if samples > 1 else {}
            a = r.ask(row["question"], max_tokens=128, **kw, **sampling)
            ok = answers_match(a.answer, row["gold"])
            e = ground(row["question"], parse_steps(a.text), a.answer, None)
            claims = sum(len(st.claims) for st in e.steps)
            good = ok and claims >= 2 and e.complete is True and all(st.ok is not False for st in e.steps)
            t = tally[terms(row)]
            t[0], t[1], t[2] = t[0] + ok, t[1] + good, t[2] + 1
            hit |= good
            corrections += a.corrections
        covered += hit
    n = sum(t[2] for t in tally.values())
    return {
        "accuracy": sum(t[0] for t in tally.values()) / n,
        "procedure": sum(t[1] for t in tally.values()) / n,
        "covered": covered / len(rows),
        "by_terms": {
            k: {"accuracy": t[0] / t[2], "procedure": t[1] / t[2]} for k, t in tally.items() if t[2]
        },
        "corrections_per_answer": corrections / n,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=Path, required=True, help="a run's traces/questions.jsonl")
    ap.add_argument("--styles", nargs="+", default=["one", "two", "both", "closest"])
    ap.add_argument("-n", type=int, default=40, help="training questions, half two-term, half three-term")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per question (T=0.7)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/teacher_prompts.json")
    args = ap.parse_args()
    from nestling.distill.teachers import load_teacher

    rows = training_rows(args.questions, args.n)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update({"cpu": cpu(), "questions": len(rows), "samples": args.samples})
    teacher = load_teacher("gguf:smollm2", n_threads=1, calculator=True)
    r, render = teacher.reasoner, teacher.chat_render
    try:
        for style in args.styles:
            messages = style_messages(style)
            r.prompt = lambda q, _e, messages=messages: render(messages(q))
            out = {
                "greedy": score(r, rows, 1),
                "greedy + calculator": score(r, rows, 1, calculator=True),
                f"{args.samples} samples + calculator": score(r, rows, args.samples, calculator=True),
            }
            results.setdefault("styles", {})[style] = out
            print(style, json.dumps(out), flush=True)
    finally:
        teacher.close()
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
