"""Does verification when serving pay? Accuracy, shares of fully-checked and of complete explanations and
latency per answer, greedy vs plain sampling vs resample-until-complete vs the calculator in the loop (a false
result corrected as it is written, core.calculator), side by side on the same questions.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_serve_verify.py --export runs/default/exports/smollm2
    OMP_NUM_THREADS=1 python3 benchmarks/bench_serve_verify.py        # a tiny student trained here (~2 min)
    OMP_NUM_THREADS=1 python3 benchmarks/bench_serve_verify.py --export RUN/exports/smollm2-c30-w768 \
        --questions RUN/traces/questions.jsonl -n 200 --out benchmarks/results/serve_verify_compact.json
    ... --teacher gguf:smollm2       # the teacher too: the same runtime and checks, its own prompt

A complete explanation (``complete_share``) has every step grounded in the question or unchecked and an
answer the steps derive (core.explain.ground); ``verified_share`` counts only the arithmetic of the checked
steps. With --export, the teacher's shares come from the run's teacher_eval.json beside it (greedy). Each
run also gives its latency against greedy's and why its incomplete explanations are incomplete. Writes
benchmarks/results/serve_verify.json. Questions: one-digit sums and differences (the tiny
student's task) unless --export's manifest names a task this script cannot draw; then pass --questions
FILE.jsonl with {"question", "answer"} lines.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"model": model, "avx512": "avx512f" in flags}


def trained_export(cache: Path) -> Path:
    """A tiny student trained long enough to write the format (and still get many steps wrong)."""
    from conftest import arithmetic_rows, build_tiny_student
    from nestling.export.pipeline import ExportConfig, export_student

    out, student = cache / "verify-export", cache / "verify-student"
    if (out / "manifest.json").is_file():
        return out
    if not (student / "config.json").is_file():
        build_tiny_student(student, steps=800, seed=1, lr=2e-3)
    cfg = ExportConfig(
        student=str(student), out=str(out), threads=1, f16_logit_tol=2.0, variants=["gguf-f16"]
    )
    export_student(cfg, prompts=arithmetic_rows(12, 123))
    return out


def questions(path: Path | None, n: int) -> list[tuple[str, str]]:
    """{question, answer} lines, or a run's traces/questions.jsonl ({question, gold, split}: held-out)."""
    if path is not None:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("split", "heldout") == "heldout"]
        return [(r["question"], str(r["answer"] if "answer" in r else r["gold"])) for r in rows][:n]
    from conftest import arithmetic_rows

    return arithmetic_rows(n, seed=999)


def run(r, rows: list[tuple[str, str]], max_tokens: int, **kw) -> dict:
    """Accuracy, share verified and complete, tries and latency over the rows (one call at a time: latency
    per answer), and why the incomplete explanations are incomplete."""
    from nestling.core.explain import answers_match, ground, parse_steps

    right, verified, complete, cut, tries, secs = 0, 0, 0, 0, [], []
    reasons: Counter[str] = Counter()
    for q, gold in rows:
        t0 = time.perf_counter()
        a = r.ask(q, max_tokens=max_tokens, **kw)
        secs.append(time.perf_counter() - t0)
        right += answers_match(a.answer, gold)
        verified += a.verified is True
        complete += a.complete is True
        cut += a.finish_reason == "length"
        tries.append(a.tries)
        if a.complete is not True:
            why = ground(q, parse_steps(a.text), a.answer, r.task).reason or "grounding not asked"
            reasons[re.sub(r"\bstep \d+", "step n", why)] += 1
    n = len(rows)
    return {
        "accuracy": right / n, "verified_share": verified / n, "complete_share": complete / n,
        "cut_at_max_tokens": cut / n, "mean_tries": statistics.mean(tries),
        "latency_ms_mean": 1000 * statistics.mean(secs), "latency_ms_p50": 1000 * statistics.median(secs),
        "latency_ms_max": 1000 * max(secs), "questions": n,
        "incomplete_reasons": dict(reasons.most_common()),
    }  # fmt: skip


def teacher_share(export: Path) -> dict | str:
    """The teacher's figures from the run the export came from (its eval: greedy, the teacher's own engine
    and prompt, the same held-out questions); serving the teacher here would take its own engine."""
    path = export.resolve().parents[1] / "teacher_eval.json"
    if not path.is_file():
        return f"no {path}"
    e = json.loads(path.read_text())["result"]["explain"]
    keys = ("accuracy", "steps_all_right", "complete", "ungrounded", "n")
    return {"source": str(path), **{k: e.get(k) for k in keys}}


def teacher_reasoner(spec: str, task: str | None):
    """The teacher GGUF behind the student's runtime, reading the teacher's own prompt (its chat template over
    distill.prompts' messages, as traces and eval send it), so both get the same engine, cut and checks."""
    from nestling.distill.prompts import teacher_messages
    from nestling.distill.teachers import chat_renderer, resolve_gguf
    from nestling.serve.engines import GGUFEngine
    from nestling.serve.runtime import Reasoner

    eng = GGUFEngine(resolve_gguf(spec.removeprefix("gguf:")), n_threads=1)
    render = chat_renderer(eng.llm)
    return Reasoner(
        eng,
        variant="teacher",
        name=spec,
        task=task,
        prompt=lambda q, _explain: render(teacher_messages(q)),
    )


def configs(tries: list[int], calculator: bool) -> dict[str, dict]:
    from nestling.serve.runtime import VERIFY_TEMPERATURE
    from nestling.serve.sampling import SamplingParams

    out: dict[str, dict] = {
        "greedy": {},
        f"sampled T={VERIFY_TEMPERATURE}": {"sampling": SamplingParams(VERIFY_TEMPERATURE, seed=0)},
    }
    out.update({f"verify {k}": {"verify": k, "sampling": SamplingParams(seed=0)} for k in tries})
    if calculator:
        out["calculator"] = {"calculator": True}
        out.update({f"calculator + verify {k}": {"calculator": True, "verify": k} for k in tries[:1]})
    return out


def measure(r, rows: list[tuple[str, str]], max_tokens: int, plan: dict[str, dict]) -> dict:
    r.ask(rows[0][0])  # warm-up
    runs = {}
    for name, kw in plan.items():
        runs[name] = run(r, rows, max_tokens, **kw)
        print(f"{r.name[:12]:12s} {name:24s} {json.dumps(runs[name])}", flush=True)
    greedy = runs["greedy"]["latency_ms_mean"]
    for res in runs.values():
        res["latency_vs_greedy"] = round(res["latency_ms_mean"] / greedy, 3)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, help="an export directory (default: a tiny student trained here)")
    ap.add_argument(
        "--questions", type=Path, help="JSONL of {question, answer}; default: one-digit arithmetic"
    )
    ap.add_argument("-n", type=int, default=100, help="questions")
    ap.add_argument("--tries", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-tokens", type=int, default=48, help="per generation (48: the previous figures')")
    ap.add_argument(
        "--no-calculator", dest="calculator", action="store_false", help="skip the calculator runs"
    )
    ap.add_argument(
        "--teacher", help="also serve this teacher (gguf:smollm2) with its own prompt: greedy, calculator"
    )
    ap.add_argument(
        "--teacher-max-tokens", type=int, default=256, help="its generation budget (traces' default)"
    )
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nestling-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_verify.json")
    args = ap.parse_args()

    from nestling.serve.runtime import VERIFY_TEMPERATURE, Reasoner

    from nestling.core.manifest import atomic_write_json

    export = args.export or trained_export(args.cache)
    rows = questions(args.questions, args.n)
    results: dict = {
        "export": str(export), "temperature": VERIFY_TEMPERATURE, "max_tokens": args.max_tokens, "runs": {},
    }  # fmt: skip
    with Reasoner.load(export, engine="gguf") as r:
        results["variant"] = r.variant
        results["runs"] = measure(r, rows, args.max_tokens, configs(args.tries, args.calculator))
        task = r.task
    if args.teacher:
        with teacher_reasoner(args.teacher, task) as t:
            plan = {k: v for k, v in configs([], True).items() if not k.startswith("sampled")}
            served = measure(t, rows, args.teacher_max_tokens, plan)
        results["teacher_served"] = {
            "spec": args.teacher,
            "max_tokens": args.teacher_max_tokens,
            "runs": served,
        }
    if args.export:
        results["teacher"] = teacher_share(args.export)
    results["cpu"] = cpu()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    print(f"[bench_serve_verify] wrote {args.out}")


if __name__ == "__main__":
    main()
