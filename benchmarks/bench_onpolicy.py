"""Off-policy KD vs on-policy GKD vs the mix at equal wall-clock, on a toy small enough for a few minutes.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_onpolicy.py --seconds 40 --out benchmarks/results/onpolicy.json

The teacher is a 2-layer llama (hidden 256) trained here on one-digit sums and differences (the test suite's
tiny student, trained longer); the student is that teacher cut to 1 layer and 128 MLP channels (compress's
prune_mlp, same tokenizer), recovered from it by ``distill.train`` three ways for the same seconds of
training: off-policy (KD 0.9 + CE on the run's verified rationales), on-policy (lmbda 1: the student samples,
the teacher scores every token, GJSD beta), and mix (lmbda 0.5). Steps per objective: from a timed probe.
Accuracy is greedy, explain mode, on the run's held-out questions. A toy: it says whether the mechanism moves
accuracy the right way on this machine, not what SmolLM2 students will do.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nestling.distill.accel import cpu_info  # noqa: E402

from nestling.core.manifest import atomic_write_json  # noqa: E402


def accuracy(model_dir: Path, held: list[dict]) -> float:
    from nestling.distill.evaluate import generate
    from nestling.distill.students import load_student

    from nestling.core.explain import extract_answer
    from nestling.core.prompting import student_prompt

    model, tok = load_student(model_dir)
    texts, _, _ = generate(model, tok, [student_prompt(r["question"]) for r in held], 24, 16, "eval", False)
    return sum(extract_answer(t) == r["gold"] for t, r in zip(texts, held, strict=True)) / len(held)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=40.0, help="training seconds per objective")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--work", default="/tmp/bench_onpolicy")
    p.add_argument("--out", default="benchmarks/results/onpolicy.json")
    args = p.parse_args()

    import shutil

    import torch
    from conftest import arithmetic_rows, build_tiny_student, training_texts
    from fake_run import make_run
    from nestling.distill.prune import prune_mlp
    from nestling.distill.students import count_params, load_student, save_student
    from nestling.distill.train import TrainConfig, train

    from nestling.core.manifest import read_jsonl, read_manifest

    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    teacher_dir = build_tiny_student(work / "teacher", steps=args.teacher_steps)
    teacher, tok = load_student(teacher_dir)
    run0 = make_run(work / "run0", n=200, heldout=60)
    held = [r for r in read_jsonl(run0 / "traces/questions.jsonl") if r["split"] == "heldout"]
    student = teacher
    student.model.layers = student.model.layers[:1]
    student.config.num_hidden_layers = 1
    student = prune_mlp(student, tok, training_texts(arithmetic_rows(64, seed=1)), 128)
    student_dir = save_student(student, tok, work / "student")
    result = {
        **cpu_info(),
        "command": " ".join(sys.argv),
        "teacher_params": count_params(load_student(teacher_dir)[0]),
        "student_params": count_params(student),
        "heldout": len(held),
        "teacher_acc": accuracy(teacher_dir, held),
        "student_before_acc": accuracy(student_dir, held),
        "seconds_per_objective": args.seconds,
        "beta": args.beta,
        "objectives": {},
    }
    modes = {"off-policy": dict(lmbda=0.0, kd_alpha=0.9), "on-policy": dict(lmbda=1.0, kd_alpha=0.0),
             "mix": dict(lmbda=0.5, kd_alpha=0.9)}  # fmt: skip
    for name, kw in modes.items():
        base = dict(
            student=f"s=hf:{student_dir}", kd_teacher=f"hf:{teacher_dir}", objective="cot", batch_size=8,
            lr=1e-3, max_new_tokens=24, beta=args.beta, threads=1, progress=False, precision="fp32",
            checkpoint_every=0, **kw,
        )  # fmt: skip
        probe_run = make_run(work / f"probe-{name}", n=200, heldout=60)
        t0 = time.perf_counter()
        train(TrainConfig(run=str(probe_run), steps=6, warmup=1, **base))
        per_step = (time.perf_counter() - t0) / 6
        steps = max(6, int(args.seconds / per_step))
        run = make_run(work / f"run-{name}", n=200, heldout=60)
        out = train(TrainConfig(run=str(run), steps=steps, warmup=steps // 10, **base))
        m = read_manifest(out)["metrics"]
        result["objectives"][name] = {
            "steps": steps,
            "train_seconds": m["train_seconds"],
            "onpolicy_steps": m["onpolicy_steps"],
            "heldout_acc": accuracy(out / "model", held),
        }
        print(name, result["objectives"][name], flush=True)
    atomic_write_json(Path(args.out), result)
    print(result)


if __name__ == "__main__":
    main()
