"""Long chain vs short rationale: the same verified traces, one student trained on each style.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_teacher_styles.py                 # tiny, 300 steps, 1 digit
    OMP_NUM_THREADS=1 python3 benchmarks/bench_teacher_styles.py --digits 2 --steps 600 --n 400

The question ("long to short"): does a small student learn more from the steps of a long chain that
carry checkable claims plus the conclusion ("short") than from the whole chain ("full")? Li et al. 2025
("Small Models Struggle to Learn from Strong Reasoners") found so for students of a few hundred million
parameters. Here the teacher is scripted and local, an R1-style writer of ``<think>`` chains for sums of
one-digit (default) or two-digit numbers (tens, ones, recombination), a re-check and filler sentences. It
stands in for a reasoning model this CPU cannot run; what it measures is the effect of the style on a tiny
student at equal optimizer steps, not a real teacher's quality. One traces run; the kept rows are re-filtered
into the short style (no teacher call); a student per style, same seed, steps, batch and max length;
held-out accuracy with 95% Wilson intervals. Writes benchmarks/results/teacher_styles_{1,2}digit.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

TASK = (
    "rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits={d}&max_digits={d}&operators=+"
    "&allow_parentheses=false&allow_negation=false"
)
FILLER = [
    "Hmm, that seems straightforward, but let me be careful.",
    "Let me make sure I do not make a careless mistake here.",
    "Addition does not depend on the order of the numbers.",
    "I should watch out for a carry into the tens.",
    "This is a simple problem, but let me be thorough anyway.",
    "Okay, let me think about how to organise this.",
    "It helps to write things out explicitly.",
    "Let me slow down and go through it again in my head.",
]


def verbose_chain(a: int, b: int, rng: random.Random) -> str:
    t, o = (a // 10 + b // 10) * 10, a % 10 + b % 10
    f = rng.sample(FILLER, 4)
    if a < 10 and b < 10:  # one digit: no tens to split, the same shape around one sum and its re-check
        return "\n".join(
            [
                f"Okay, so the question asks for the sum of {a} and {b}. {f[0]}",
                f"The two numbers are {a} and {b}. {f[1]}",
                f"Adding them, {a} + {b} = {a + b}.",
                f"{f[2]} Wait, let me double-check in the other order: {b} + {a} = {a + b}. Yes. {f[3]}",
                f"So the total is {a + b}.",
            ]
        )
    return "\n".join(
        [
            f"Okay, so the question asks for the sum of {a} and {b}. {f[0]}",
            f"I will split both numbers into tens and ones. {f[1]}",
            f"The tens first: {a // 10 * 10} + {b // 10 * 10} = {t}.",
            f"{f[2]} Then the ones: {a % 10} + {b % 10} = {o}.",
            f"Putting the parts together, {t} + {o} = {t + o}.",
            f"Wait, let me double-check the whole thing: {a} + {b} = {a + b}. Yes, that matches. {f[3]}",
            f"So the total is {a + b}.",
        ]
    )


def verbose_teacher():
    from nestling.distill.teachers import Generation, Teacher, with_chain

    class VerboseTeacher(Teacher):
        spec, params, batch = "scripted-r1-style", None, 16

        def _generate_one(self, messages, sampling, seed):
            a, b = map(int, re.search(r"(\d+) \+ (\d+)", messages[-1]["content"]).groups())
            chain = verbose_chain(a, b, random.Random(seed * 100_003 + a * 101 + b))
            text = f"<think>\n{chain}\n</think>\n\nAnswer: {a + b}"
            return with_chain(Generation(text, len(text.split()), 0.0))

    return VerboseTeacher()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--digits", type=int, default=1, choices=[1, 2], help="digits per operand")
    p.add_argument("--n", type=int, default=300, help="questions (train + held-out)")
    p.add_argument("--heldout", type=int, default=60)
    p.add_argument("--student", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument(
        "--max-new-tokens", type=int, default=320, help="explain-mode budget at eval (full chains)"
    )
    p.add_argument("--work", default="/tmp/nestling-bench-styles-{digits}")
    p.add_argument("--fresh", action="store_true", help="delete --work first")
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "teacher_styles_{digits}digit.json")
    )
    a = p.parse_args()

    import nestling.distill.traces as traces
    from nestling.distill.evaluate import EvalConfig, evaluate
    from nestling.distill.train import TrainConfig, train

    traces.load_teacher = lambda spec, n_threads=None, **kw: verbose_teacher()
    # Every stage resumes (traces skip, training continues from its last checkpoint): re-running the same
    # command after an interruption picks up where it stopped. --fresh starts over.
    work = Path(a.work.format(digits=a.digits))
    if a.fresh:
        shutil.rmtree(work, ignore_errors=True)
    task = TASK.format(d=a.digits)
    base = dict(task=task, n=a.n, heldout=a.heldout, samples=2, out=str(work / "full"))
    traces.run_traces(traces.TracesConfig(**base), progress=False)
    if not (work / "short" / "traces").is_dir():
        shutil.copytree(work / "full" / "traces", work / "short" / "traces")
    traces.run_traces(traces.TracesConfig(**{**base, "out": str(work / "short"), "rationale_style": "short"}))
    results = {}
    for style in ("full", "short"):
        run = work / style
        card = json.loads((run / "traces" / "datacard.json").read_text())
        t0 = time.perf_counter()
        student = train(
            TrainConfig(
                run=str(run), student=a.student, steps=a.steps, max_len=512, threads=2, progress=False
            )
        )
        train_s = time.perf_counter() - t0
        m = json.loads((student / "manifest.json").read_text())["metrics"]
        ev = evaluate(
            EvalConfig(run=str(run), teacher="none", max_new_tokens=a.max_new_tokens, progress=False)
        )
        s = ev["students"][student.name]
        results[style] = {
            "kept_rows": card["kept"],
            "mean_steps": card["styles"][f"mean_steps_{style}"],
            "train_seconds": round(train_s, 1),
            "train_metrics": {
                k: m.get(k) for k in ("steps", "final_loss", "train_tokens_per_s", "examples_cut")
            },
            "explain": {
                k: s["explain"].get(k)
                for k in ("accuracy", "accuracy_ci", "steps_all_right", "mean_new_tokens", "truncated", "n")
            },
            "answer": {k: s["answer"].get(k) for k in ("accuracy", "accuracy_ci")},
            "baseline": ev["baseline"].get("accuracy"),
        }
        print(style, json.dumps(results[style]), flush=True)
    report = {
        "question": "held-out accuracy of one student trained on full chains vs on their short form",
        "teacher": "scripted R1-style <think> chains (tens, ones, recombination, re-check, filler), "
        "not a real model",
        "task": task,
        "student": a.student,
        "steps": a.steps,
        "command": "OMP_NUM_THREADS=1 python3 benchmarks/bench_teacher_styles.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    out = Path(a.out.format(digits=a.digits))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
