"""Teacher throughput at concurrency 1, 4, 16 and 64 against a stand-in server with a fixed latency.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_teacher.py                  # 200 ms per request
    OMP_NUM_THREADS=1 python3 benchmarks/bench_teacher.py --latency 0.2 --per-slot 24 --concurrency 1 4 16 64

The question: are OpenAI-compatible teachers pipelined well enough that a slow server, not
nestling, sets the pace? With a fixed per-request latency L and c requests in flight the ideal is c / L
rationales/s; the target is at least 80% of it at c = 64. The stand-in (tests/teacher_fakes.py) runs in its
own process so the server's work does not share this process's interpreter lock. Two paths are timed side
by side at every concurrency:
  stream   teacher.stream() alone: the openai SDK, its thread pool, the bounded window;
  traces   the traces stage (run_traces) in a fresh run directory: prompts, answer extraction and the
           fsync'd appends while generating (rationales_per_s, over the stage's own generation wall time);
           stage_rationales_per_s also counts the fixed costs after it (filters, data card, manifest).
Writes benchmarks/results/teacher_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# Questions from a file task: distinct, no dataset library in the timed path.
QUESTIONS = [f"What is {a} + {b}?" for a in range(1000) for b in range(10)]


def start_server(latency: float, mode: str) -> tuple[subprocess.Popen, str]:
    from peers import free_port

    port = free_port()
    cmd = [sys.executable, str(ROOT / "tests" / "teacher_fakes.py"), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--latency", str(latency), "--mode", mode], stdout=subprocess.PIPE, text=True
    )
    url = proc.stdout.readline().strip()  # printed once the socket listens
    return proc, url


def time_stream(url: str, concurrency: int, n: int) -> dict:
    from nestling.distill.prompts import teacher_messages
    from nestling.distill.teachers import Job, Sampling, load_teacher

    teacher = load_teacher(f"openai:m@{url}", concurrency=concurrency, retries=0)
    jobs = [Job(i, teacher_messages(q)) for i, q in enumerate(QUESTIONS[:n])]
    t0 = time.perf_counter()
    got = sum(g.error is None for _, _, g in teacher.stream(jobs, Sampling(temperature=0.7)))
    wall = time.perf_counter() - t0
    teacher.close()
    return {"requests": n, "ok": got, "wall_s": round(wall, 3), "rationales_per_s": round(got / wall, 2)}


def time_traces(url: str, concurrency: int, n: int, tmp: Path) -> dict:
    from nestling.distill.traces import TracesConfig, run_traces

    data = tmp / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in QUESTIONS))
    out = tmp / f"run-c{concurrency}"
    cfg = TracesConfig(
        task=f"file:{data}",
        teacher=f"openai:m@{url}",
        n=n + 1,
        heldout=1,
        samples=1,
        concurrency=concurrency,
        retries=0,
        out=str(out),
    )
    t0 = time.perf_counter()
    run_traces(cfg, progress=False)
    wall = time.perf_counter() - t0
    records = len((out / "traces" / "traces.jsonl").read_text().splitlines())
    gen = json.loads((out / "traces" / "datacard.json").read_text())["time"][
        "generation_wall_seconds_last_run"
    ]
    return {
        "requests": n,
        "ok": records,
        "wall_s": round(wall, 3),
        "generation_wall_s": gen,
        "rationales_per_s": round(records / gen, 2),
        # The whole stage, counting its fixed costs: task load, filters, data card, manifest hashes.
        "stage_rationales_per_s": round(records / wall, 2),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(cs, [r["ideal_per_s"] for r in results], "k--", label="ideal c / latency")
    ax.plot(cs, [r["stream"]["rationales_per_s"] for r in results], "o-", label="teacher.stream")
    ax.plot(cs, [r["traces"]["rationales_per_s"] for r in results], "s-", label="traces stage")
    ax.set(xscale="log", yscale="log", xlabel="requests in flight", ylabel="rationales/s")
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.legend()
    ax.set_title("teacher throughput vs a stand-in with fixed latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency", type=float, default=0.2, help="stand-in seconds per request")
    # 24 requests per slot: ~4.8 s of ideal work at every concurrency, so the ramp-up (threads, connections)
    # does not dominate; at 8 per slot it cost c = 64 a quarter of its share.
    p.add_argument("--per-slot", type=int, default=24, help="requests per concurrency slot (n = c x this)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--mode", default="reasoning_content", help="where the stand-in puts the chain")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_throughput"))
    a = p.parse_args()
    proc, url = start_server(a.latency, a.mode)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in a.concurrency:
                n = max(16, c * a.per_slot)
                ideal = c / a.latency
                row = {"concurrency": c, "ideal_per_s": ideal}
                row["stream"] = time_stream(url, c, n)
                row["traces"] = time_traces(url, c, n, Path(tmp))
                for side in ("stream", "traces"):
                    row[side]["share_of_ideal"] = round(row[side]["rationales_per_s"] / ideal, 3)
                print(json.dumps(row), flush=True)
                results.append(row)
    finally:
        proc.terminate()
        proc.wait()
    at64 = next((r for r in results if r["concurrency"] == 64), None)
    report = {
        "question": "teacher rationales/s vs the ideal c / latency against a stand-in OpenAI server",
        "latency_s": a.latency,
        "mode": a.mode,
        "cpus": os.cpu_count(),
        "target": "traces stage >= 80% of ideal at concurrency 64",
        "target_met": bool(at64 and at64["traces"]["share_of_ideal"] >= 0.8),
        "command": "OMP_NUM_THREADS=1 python3 benchmarks/bench_teacher.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and .png; target met: {report['target_met']}")


if __name__ == "__main__":
    main()
