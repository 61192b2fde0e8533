"""A run directory's trace store written directly (no teacher): one-digit sums and differences.

    make_run(tmp_path / "run", n=120, heldout=30)   # RUN/traces/{questions,kept}.jsonl

Used by the student-stage tests (train, eval, distill) so they never wait for a teacher.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASK = "rg:basic_arithmetic"


def make_run(run: Path, n: int = 120, heldout: int = 30, seed: int = 0, kept: bool = True) -> Path:
    rng = random.Random(seed)
    pairs = [(a, b, op) for a in range(10) for b in range(10) for op in "+-"]
    rng.shuffle(pairs)
    questions, rows = [], []
    for i, (a, b, op) in enumerate(pairs[:n]):
        gold = str(a + b if op == "+" else a - b)
        qid, q = f"q{i:06d}", f"What is {a} {op} {b}?"
        split = "heldout" if i < heldout else "train"
        questions.append({"id": qid, "task": TASK, "question": q, "gold": gold, "split": split, "meta": {}})
        if split == "train" and kept:
            steps = [f"{a} {op} {b} = {gold}"]
            rows.append(
                {
                    "qid": qid,
                    "task": TASK,
                    "question": q,
                    "answer": gold,
                    "steps": steps,
                    "source": "verified",
                }
            )
    traces = run / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    (traces / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in questions))
    (traces / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run
