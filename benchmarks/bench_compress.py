"""Compact students cut from the self-distilled SmolLM2 (trimmed vocabulary, layers and/or MLP channels
pruned by measured importance, recovered by logit KD), side by side with the teacher: parameters, accuracy,
per-answer latency; one student per shape and seed.

    nestling traces --out runs/compress --n 360 --heldout 200      # 160 train + 200 held-out questions
    nestling train --run runs/compress --student gguf:smollm2         # the self-distilled student
    OMP_NUM_THREADS=2 python3 benchmarks/bench_compress.py --run runs/compress --layers 30 --width 768 \
        --seeds 0 1 2 --recover-steps 300 --lr 1e-4 --kd-alpha 0.9 --latency-questions 100 \
        --out benchmarks/results/compact_3seeds

For each --layers K (and seed), distill.compress builds RUN/students/smollm2-cK[-wW][-sS] (-sS for seeds
above 0; resumable). Every model is then
  - scored in PyTorch on the whole held-out split, explain and answer-only modes (nestling eval, cached),
  - exported to GGUF Q8_0 (parity-checked by the export stage) and asked the first --latency-questions
    held-out questions one at a time through nestling.serve.Reasoner (llama.cpp, 1 thread): per-answer
    latency as a user waits for it, and the Q8_0 file's own accuracy,
beside the teacher's GGUF answering the same questions with the prompt that wrote the traces (same engine,
same thread count, timed in the same run). With several seeds, OUT.json's "seeds" holds mean and standard
deviation per shape. Writes OUT.json and OUT.png (accuracy against per-answer latency, marker area ~
parameters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nestling.distill.stats import wilson  # noqa: E402

from nestling.core.manifest import atomic_write_json  # noqa: E402


def acc(ok: list[bool]) -> dict:
    return {"accuracy": round(sum(ok) / max(1, len(ok)), 4), "ci95": wilson(sum(ok), len(ok)), "n": len(ok)}


def acc_of(result: dict, n: int) -> dict:
    """An eval result's accuracy over n questions, with its interval (eval stores the rate, not the list)."""
    k = round(result["accuracy"] * n)
    return {"accuracy": round(k / n, 4), "ci95": wilson(k, n), "n": n}


def _timing(seconds: list[float]) -> dict:
    return {"mean_s": round(statistics.fmean(seconds), 4), "median_s": round(statistics.median(seconds), 4)}


def time_teacher(run: Path, held: list[dict], scorer, threads: int) -> dict:
    from nestling.distill.evaluate import default_teacher, traces_config
    from nestling.distill.prompts import teacher_messages
    from nestling.distill.teachers import Sampling, load_teacher

    tcfg = traces_config(run)
    fewshot = bool(tcfg.get("fewshot", True))
    sampling = Sampling(temperature=0.0, max_tokens=int(tcfg.get("max_tokens") or 64), seed=0)
    teacher = load_teacher(default_teacher(run), n_threads=threads)
    ok, secs, tokens = [], [], []
    try:
        teacher.generate([teacher_messages(held[0]["question"], fewshot=fewshot)], n=1, sampling=sampling)
        for row in held:
            g = teacher.generate(
                [teacher_messages(row["question"], fewshot=fewshot)], n=1, sampling=sampling
            )[0][0]
            ok.append(scorer.score(row, scorer.extract(row, g.text)))
            secs.append(g.seconds)
            tokens.append(g.tokens)
    finally:
        teacher.close()
    return {"explain": {**acc(ok), **_timing(secs), "mean_new_tokens": statistics.fmean(tokens)}}


def time_export(export_dir: Path, held: list[dict], scorer, threads: int) -> dict:
    from nestling.serve.runtime import Reasoner

    out = {}
    with Reasoner.load(export_dir, variant="gguf-q8_0", n_threads=threads) as r:
        r.ask(held[0]["question"], explain=False)  # warm-up: first-call allocations are not an answer
        for mode, explain, budget in (("answer", False, 16), ("explain", True, 128)):
            ok, secs, tokens = [], [], []
            for row in held:
                a = r.ask(row["question"], explain=explain, max_tokens=budget)
                ok.append(scorer.score(row, a.answer))
                secs.append(a.latency.total_s)
                tokens.append(a.latency.completion_tokens)
            out[mode] = {**acc(ok), **_timing(secs), "mean_new_tokens": statistics.fmean(tokens)}
    return out


def q8_bytes(export_dir: Path) -> int:
    return json.loads((export_dir / "manifest.json").read_text())["variants"]["gguf-q8_0"]["bytes"]


def export_q8(run: Path, name: str, threads: int) -> Path:
    from nestling.export.pipeline import ExportConfig, export_student

    out = run / "exports" / f"{name}-q8"
    cfg = ExportConfig(
        student=str(run / "students" / name / "model"),
        out=str(out),
        variants=["gguf-q8_0"],
        parity_prompts=16,
        threads=threads,
    )
    export_student(cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/compress")
    p.add_argument("--source", default="smollm2", help="the self-distilled student to compress")
    p.add_argument("--layers", type=int, nargs="+", default=[18, 10], help="layers kept, one student each")
    p.add_argument("--width", type=int, default=None, help="MLP channels kept (default: all)")
    p.add_argument("--recover-steps", type=int, default=600)
    p.add_argument(
        "--recover-minutes",
        type=float,
        default=0.0,
        help="each recovery's wall-clock budget (steps: at most --recover-steps): objectives at equal time",
    )
    p.add_argument("--fresh", type=int, default=400)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one compact student per seed and shape")
    p.add_argument(
        "--objectives",
        nargs="+",
        default=["off-policy"],
        help="recovery objectives, OBJECTIVE[:STEPS] each (compress --objective; STEPS: its recovery steps, "
        "default --recover-steps; give on-policy fewer to compare at equal wall-clock)",
    )
    p.add_argument("--beta", type=float, default=0.5, help="on-policy generalized JSD beta")
    p.add_argument("--threads", type=int, default=2, help="training and PyTorch eval threads")
    p.add_argument("--latency-questions", type=int, default=100, help="held-out questions timed one by one")
    p.add_argument("--out", default="benchmarks/results/compress")
    p.add_argument(
        "--tag",
        default="",
        help="appended to each compact student's name, so a changed recipe (say, more recovery steps) gets "
        "its own directory beside the cached ones",
    )
    args = p.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nestling.distill.accel import cpu_info
    from nestling.distill.compress import CompressConfig, compress, trim_name
    from nestling.distill.evaluate import EvalConfig, evaluate
    from nestling.distill.tasks import TaskScorer

    from nestling.core.rundir import RunDir

    run = Path(args.run)
    names, seconds = [args.source, trim_name(args.source)], {}
    for k in args.layers:
        for seed in args.seeds:
            for objective, steps in objectives(args):
                cfg = CompressConfig(
                    run=str(run),
                    source=args.source,
                    name=seeded(shape_name(args, k, objective), seed),
                    keep_layers=k,
                    intermediate_size=args.width,
                    recover_steps=steps,
                    recover_minutes=args.recover_minutes,
                    fresh=args.fresh,
                    kd_alpha=args.kd_alpha,
                    lr=args.lr,
                    objective=objective,
                    beta=args.beta,
                    seed=seed,
                    threads=args.threads,
                    progress=False,
                )
                t0 = time.perf_counter()
                compress(cfg)
                seconds[str(cfg.name)] = round(time.perf_counter() - t0, 1)
                names.append(str(cfg.name))
    ev = evaluate(
        EvalConfig(run=str(run), students=names, latency_samples=0, threads=args.threads, progress=False)
    )
    _, held = RunDir(run).splits()
    timed = held[: args.latency_questions]
    scorer = TaskScorer()
    teacher = ev["teacher"]
    res: dict = {
        "run": str(run),
        "machine": cpu_info(),
        "heldout": len(held),
        "latency_questions": len(timed),
        "engine": "llama.cpp via nestling.serve.Reasoner (students, GGUF Q8_0) and the teacher backend "
        "(bundled GGUF), 1 thread each, one question at a time",
        "teacher": {
            "spec": teacher["spec"],
            "params": teacher["params"],
            "heldout": acc_of(teacher, len(held)),
            "gguf": time_teacher(run, timed, scorer, 1),
        },
        "students": {},
    }
    t_lat = res["teacher"]["gguf"]["explain"]["mean_s"]
    for name in names:
        s = ev["students"][name]
        manifest = json.loads((run / "students" / name / "manifest.json").read_text())
        exp = export_q8(run, name, 1)
        gguf = time_export(exp, timed, scorer, 1)
        row = {
            "params": s["params"],
            "param_ratio": round(s["params"] / teacher["params"], 4),
            "q8_0_bytes": q8_bytes(exp),
            "pytorch": {mode: acc_of(s[mode], len(held)) for mode in ("explain", "answer")},
            "gguf_q8_0": gguf,
            "speedup_vs_teacher": {m: round(t_lat / gguf[m]["mean_s"], 2) for m in ("answer", "explain")},
            "compress_seconds": seconds.get(name),
            "compress": manifest.get("metrics"),
        }
        res["students"][name] = row
    base = res["students"][args.source]["gguf_q8_0"]
    for row in res["students"].values():
        row["speedup_vs_self_distilled"] = {
            m: round(base[m]["mean_s"] / row["gguf_q8_0"][m]["mean_s"], 2) for m in ("answer", "explain")
        }
    if len(args.seeds) > 1:
        res["seeds"] = seed_summary(res, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), res)
    plot(res, out.with_suffix(".png"))
    print(json.dumps({k: _brief(v) for k, v in res["students"].items()}, indent=1))
    print("teacher", json.dumps(res["teacher"]["heldout"]), json.dumps(res["teacher"]["gguf"]))
    if "seeds" in res:
        print("seeds", json.dumps(res["seeds"], indent=1))


def objectives(args: argparse.Namespace) -> list[tuple[str, int]]:
    """--objectives as (objective, recovery steps) pairs."""
    out = []
    for item in args.objectives:
        name, _, steps = item.partition(":")
        out.append((name, int(steps) if steps else args.recover_steps))
    return out


def shape_name(args: argparse.Namespace, layers: int, objective: str = "off-policy") -> str:
    """The compact student's name: the off-policy one keeps the name it had before objectives existed."""
    suffix = "" if objective == "off-policy" else "-" + objective.removesuffix("-policy")
    return f"{args.source}-c{layers}" + (f"-w{args.width}" if args.width else "") + suffix + args.tag


def seeded(name: str, seed: int) -> str:
    """A compact student's name for a seed: seed 0 keeps the plain name, so a run of seeds 0 1 2 reuses the
    cached seed-0 student of an earlier single-seed run (and seeds never share a directory)."""
    return f"{name}-s{seed}" if seed else name


def seed_summary(res: dict, args: argparse.Namespace) -> dict:
    """Mean and spread over seeds of each shape: accuracy (PyTorch, both modes) and speed-ups."""
    out = {}
    for k, (objective, _) in ((k, o) for k in args.layers for o in objectives(args)):
        name = shape_name(args, k, objective)
        rows = [res["students"][seeded(name, s)] for s in args.seeds]
        stat = lambda xs: {"mean": round(statistics.fmean(xs), 4), "stdev": round(statistics.stdev(xs), 4)}  # noqa: E731
        out[name] = {
            "seeds": args.seeds,
            "params": rows[0]["params"],
            "param_ratio": rows[0]["param_ratio"],
            **{
                f"accuracy_{m}": stat([r["pytorch"][m]["accuracy"] for r in rows])
                for m in ("explain", "answer")
            },
            **{
                f"q8_0_accuracy_{m}": stat([r["gguf_q8_0"][m]["accuracy"] for r in rows])
                for m in ("explain", "answer")
            },
            **{
                f"speedup_{m}": stat([r["speedup_vs_teacher"][m] for r in rows])
                for m in ("explain", "answer")
            },
        }
    return out


def _brief(row: dict) -> dict:
    return {
        "params": row["params"],
        "ratio": row["param_ratio"],
        "pt_explain": row["pytorch"]["explain"]["accuracy"],
        "pt_answer": row["pytorch"]["answer"]["accuracy"],
        "q8_answer_s": row["gguf_q8_0"]["answer"]["mean_s"],
        "q8_explain_s": row["gguf_q8_0"]["explain"]["mean_s"],
        "speedup": row["speedup_vs_teacher"],
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    t = res["teacher"]
    tl = t["gguf"]["explain"]["mean_s"]
    ax.scatter([tl], [100 * t["heldout"]["accuracy"]], s=t["params"] / 4e5, c="black", marker="*")
    ax.annotate(
        "teacher (explain)",
        (tl, 100 * t["heldout"]["accuracy"]),
        fontsize=7,
        xytext=(4, 4),
        textcoords="offset points",
    )
    lo, hi = (100 * v for v in t["heldout"]["ci95"])
    ta = 100 * t["heldout"]["accuracy"]
    ax.errorbar([tl], [ta], yerr=[[ta - lo], [hi - ta]], fmt="none", ecolor="black", alpha=0.4)
    for i, (name, row) in enumerate(res["students"].items()):
        for mode, color in (("answer", "tab:blue"), ("explain", "tab:orange")):
            x = row["gguf_q8_0"][mode]["mean_s"]
            y = 100 * row["pytorch"][mode]["accuracy"]
            lo, hi = (100 * v for v in row["pytorch"][mode]["ci95"])
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="none", ecolor=color, alpha=0.4)
            ax.scatter([x], [y], s=row["params"] / 4e5, c=color, alpha=0.7)
            ax.annotate(
                f"{name} ({mode}, {row['param_ratio']:.2f}x)",
                (x, y),
                fontsize=6,
                xytext=(4, -8 - 7 * (i % 2)),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlabel("seconds per answer (GGUF, llama.cpp, 1 thread; log)")
    ax.set_ylabel(f"held-out accuracy, % (n={res['heldout']}, 95% CI)")
    ax.set_title("compact students vs the teacher (blue: answer-only, orange: explain)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
