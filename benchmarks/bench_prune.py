"""Which cut keeps the most before any recovery? Held-out accuracy (answer-only mode, PyTorch, greedy) of a
trimmed source pruned to several shapes, with MLP channels ranked by what they write into the residual stream
(the default) and by activation alone, side by side in one run.

    nestling compress --run runs/compress --source smollm2 --recover-steps 0     # publishes smollm2-trim
    OMP_NUM_THREADS=2 python3 benchmarks/bench_prune.py --run runs/compress --shapes 30:768 24:1024 18 \\
        --out benchmarks/results/prune_before_recovery.json

A shape is LAYERS[:WIDTH]: layers kept by angular distance (first and last always), MLP channels kept.
Writes OUT (JSON): accuracy with its 95% interval and parameters per shape and ranking.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nestling.core.manifest import atomic_write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/compress")
    p.add_argument("--source", default="smollm2-trim", help="student under RUN/students to cut")
    p.add_argument("--shapes", nargs="+", default=["30:768", "24:1024", "18"])
    p.add_argument("--calib", type=int, default=64, help="calibration texts (compress's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/prune_before_recovery.json")
    args = p.parse_args()

    from nestling.distill.accel import set_threads
    from nestling.distill.compress import calibration_texts
    from nestling.distill.evaluate import generate
    from nestling.distill.prune import keep_layers, layer_importance, prune_mlp, select_layers
    from nestling.distill.stats import wilson
    from nestling.distill.students import count_params, load_student
    from nestling.distill.tasks import TaskScorer
    from nestling.distill.train import training_rows

    from nestling.core.prompting import student_prompt
    from nestling.core.rundir import RunDir

    set_threads(args.threads)
    run = Path(args.run)
    source, tok = load_student(run / "students" / args.source / "model")
    _, held = RunDir(run).splits()
    calib = calibration_texts(training_rows(run), args.calib)
    depth = layer_importance(source, tok, calib)
    prompts = [student_prompt(r["question"], explain=False) for r in held]
    scorer = TaskScorer()

    def accuracy(model) -> dict:
        texts, _, _ = generate(model, tok, prompts, 8, 50, "", False)
        k = sum(scorer.score(r, scorer.extract(r, t)) for r, t in zip(held, texts, strict=True))
        return {"accuracy": k / len(held), "ci95": wilson(k, len(held)), "params": count_params(model)}

    res = {"run": str(run), "source": args.source, "heldout": len(held), "calib": len(calib)}
    res["shapes"] = {"uncut": accuracy(source)}
    for shape in args.shapes:
        layers, _, width = shape.partition(":")
        cut = keep_layers(copy.deepcopy(source), select_layers(depth, int(layers)))
        for ranking, by_write in (("write", True), ("activation", False)) if width else (("-", True),):
            model = prune_mlp(copy.deepcopy(cut), tok, calib, int(width), by_write) if width else cut
            res["shapes"][f"{shape} {ranking}"] = accuracy(model)
            print(shape, ranking, res["shapes"][f"{shape} {ranking}"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
