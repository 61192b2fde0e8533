"""Training throughput here: 1 vs 2 processes, families x precision x full/LoRA, and precision by row length.
JSON + PNG out.

    python3 benchmarks/bench_train.py processes --steps 120     # -> benchmarks/results/train_processes.json
    python3 benchmarks/bench_train.py families --steps 4        # -> benchmarks/results/train_families.json
    python3 benchmarks/bench_train.py lengths --steps 6         # -> benchmarks/results/train_lengths.json

processes: the tiny preset on a generated trace store (one-digit sums, no teacher), the same recipe and
global batch run by `nestling train` (one process, 2 threads) and by `torchrun --nproc_per_node 2` (two
processes, 1 thread each, DDP over gloo); tokens/s and final loss from each manifest, fp32 and bf16.

families: random models of every supported family built from transformers' config classes at one shape
(hidden 512, 4 layers, 8 query / 4 key-value heads, MLP 1536, vocabulary 8192; no download), plus a
SmolLM2-135M-shaped llama; forward + backward + AdamW on random tokens (batch 8 x 128, loss on the last 96
positions as the recipe computes it), fp32 vs bf16 autocast, full fine-tuning vs LoRA (distill.lora's
family recipe). Steps are timed after one warm-up step, cells interleaved so machine load hits all alike.

lengths: the SmolLM2-135M shape, full fine-tuning, batch 8, rows of 32, 64 and 128 tokens (the embedded
default's batches hold ~270 tokens: rows of ~34), fp32 vs bf16 autocast, the loss on every position; per
length both precisions are built and their timed steps alternate, so load hits both alike. The question: does
bf16's speed-up hold as rows get shorter? Autocast casts every weight to bf16 each step, whatever the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from nestling.core.manifest import atomic_write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
FAMILY_CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
}
SHAPE = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=8192,
    max_position_embeddings=512,
)
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=2048,
)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- processes -----------------------------------------------------------------------------------------


def _train(run: Path, args: argparse.Namespace, precision: str, processes: int) -> dict:
    flags = [
        "train",
        "--run",
        str(run),
        "--student",
        "tiny",
        "--steps",
        str(args.steps),
        "--batch-size",
        "16",
        "--threads",
        "1" if processes > 1 else "2",
        "--precision",
        precision,
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else "2", "PYTHONPATH": str(REPO)}
    if processes == 1:
        cmd = [sys.executable, "-m", "nestling", *flags]
    else:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
        cmd = [*launch, "-m", "nestling", "--", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    m = json.loads((run / "students/tiny/manifest.json").read_text())["metrics"]
    return {
        "processes": processes,
        "precision": precision,
        "wall_s": round(time.perf_counter() - t0, 1),
        **{k: m[k] for k in ("train_tokens", "train_seconds", "train_tokens_per_s", "final_loss")},
    }


def processes(args: argparse.Namespace) -> dict:
    import tempfile

    from fake_run import make_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            for n in (1, 2):
                run = make_run(Path(tmp) / f"{precision}-{n}", n=200, heldout=20)
                rows.append(_train(run, args, precision, n))
                print(rows[-1], flush=True)
    by = {(r["precision"], r["processes"]): r for r in rows}
    ratios = {
        p: round(by[(p, 2)]["train_tokens_per_s"] / by[(p, 1)]["train_tokens_per_s"], 2)
        for p in ("fp32", "bf16")
    }
    return {
        "question": "1 vs 2 training processes on 2 cores (tiny preset, global batch 16)",
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "loadavg_after": _load(),
        "rows": rows,
        "tokens_per_s_ratio_2_over_1": ratios,
    }


# ---- families ------------------------------------------------------------------------------------------


def _model(family: str, shape: dict) -> object:
    import torch
    import transformers

    config = getattr(transformers, FAMILY_CONFIGS[family])(**shape, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _cell(family: str, shape: dict, lora: bool) -> dict:
    import torch
    from nestling.distill.lora import add_lora, lora_recipe
    from nestling.distill.students import count_params

    model = _model(family, shape)
    params = count_params(model)
    if lora:
        model = add_lora(model, lora_recipe(model))
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "model": model,
        "opt": torch.optim.AdamW(trainable, lr=1e-4),
        "params": params,
        "trainable": sum(p.numel() for p in trainable),
        "seconds": 0.0,
        "steps": 0,
    }


def _step(cell: dict, ids: object, precision: str) -> None:
    import torch
    import torch.nn.functional as F
    from nestling.distill.accel import autocast, resolve_precision

    device = torch.device("cpu")
    keep = torch.arange(ids.shape[1] - 97, ids.shape[1] - 1)
    with autocast(device, resolve_precision(precision, device)):
        logits = cell["model"](input_ids=ids, logits_to_keep=keep).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, keep + 1].flatten())
    loss.backward()
    cell["opt"].step()
    cell["opt"].zero_grad(set_to_none=True)


def families(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    batch, length = 8, 128
    plan = [(f, SHAPE, p, lora) for f in FAMILY_CONFIGS for p in ("fp32", "bf16") for lora in (False, True)]
    plan += [("llama-smollm2-shape", SMOLLM2_SHAPE, p, False) for p in ("fp32", "bf16")]
    rows = []
    for name, shape, precision, lora in plan:
        cell = _cell(name.split("-")[0], shape, lora)
        ids = torch.randint(
            1, shape["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0)
        )
        _step(cell, ids, precision)  # warm-up: allocator, autocast caches
        steps = max(1, args.steps // (6 if shape is SMOLLM2_SHAPE else 1))
        t0 = time.perf_counter()
        for _ in range(steps):
            _step(cell, ids, precision)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "family": name,
                "precision": precision,
                "lora": lora,
                "params": cell["params"],
                "trainable": cell["trainable"],
                "steps": steps,
                "tokens_per_s": round(batch * length * steps / seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    by = {(r["family"], r["precision"], r["lora"]): r["tokens_per_s"] for r in rows}
    bf16_over_fp32 = {
        f"{f}{' lora' if lo else ''}": round(by[(f, "bf16", lo)] / by[(f, "fp32", lo)], 2)
        for f, _, p, lo in plan
        if p == "fp32"
    }
    return {
        "question": "training tokens/s per family at equal size: fp32 vs bf16 autocast, full vs LoRA",
        "shape": SHAPE,
        "smollm2_shape": SMOLLM2_SHAPE,
        "batch": [batch, length],
        "threads": args.threads,
        "cpu_bf16": _cpu_bf16(),
        "loadavg_after": _load(),
        "rows": rows,
        "bf16_over_fp32": bf16_over_fp32,
    }


# ---- lengths -------------------------------------------------------------------------------------------


def _timed_step(cell: dict, ids: object, precision: str) -> float:
    """One full step with the loss on every position; its seconds."""
    import torch
    import torch.nn.functional as F
    from nestling.distill.accel import autocast, resolve_precision

    device, t0 = torch.device("cpu"), time.perf_counter()
    with autocast(device, resolve_precision(precision, device)):
        logits = cell["model"](input_ids=ids[:, :-1]).logits
    F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
    cell["opt"].step()
    cell["opt"].zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def lengths(args: argparse.Namespace) -> dict:
    import gc

    import torch
    from bench_install import cpu_info

    torch.set_num_threads(args.threads)
    batch, rows = 8, []
    for length in (32, 64, 128):
        ids = torch.randint(1, 49152, (batch, length), generator=torch.Generator().manual_seed(0))
        cells = {p: _cell("llama", SMOLLM2_SHAPE, False) for p in ("fp32", "bf16")}
        for precision, cell in cells.items():
            _timed_step(cell, ids, precision)  # warm-up
        seconds = {p: 0.0 for p in cells}
        for _ in range(args.steps):
            for precision, cell in cells.items():
                seconds[precision] += _timed_step(cell, ids, precision)
        for precision, total in seconds.items():
            rows.append(
                {
                    "length": length,
                    "precision": precision,
                    "steps": args.steps,
                    "seconds_per_step": round(total / args.steps, 3),
                    "tokens_per_s": round(batch * (length - 1) * args.steps / total, 1),
                }
            )
            print(rows[-1], flush=True)
        del cells
        gc.collect()
    by = {(r["length"], r["precision"]): r["tokens_per_s"] for r in rows}
    return {
        "question": "SmolLM2-135M full fine-tuning tokens/s by row length: fp32 vs bf16 autocast",
        "machine": {**cpu_info(), "cpu_bf16": _cpu_bf16()},
        "batch": batch,
        "threads": args.threads,
        "loadavg_after": _load(),
        "rows": rows,
        "bf16_over_fp32": {str(n): round(by[(n, "bf16")] / by[(n, "fp32")], 2) for n in (32, 64, 128)},
    }


def _cpu_bf16() -> bool:
    from nestling.distill.accel import cpu_has_bf16

    return cpu_has_bf16()


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = sorted({r["family"] for r in rows}, key=[r["family"] for r in rows].index)
    fig, ax = plt.subplots(figsize=(10, 4))
    arms = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
    for i, (precision, lora) in enumerate(arms):
        vals = [
            next(
                (
                    r["tokens_per_s"]
                    for r in rows
                    if (r["family"], r["precision"], r["lora"]) == (f, precision, lora)
                ),
                0,
            )
            for f in labels
        ]
        ax.bar(
            [x + 0.2 * i for x in range(len(labels))],
            vals,
            width=0.2,
            label=f"{precision} {'LoRA' if lora else 'full'}",
        )
    ax.set_xticks([x + 0.3 for x in range(len(labels))], labels, rotation=15)
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"training throughput, {result['threads']} CPU threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", choices=("processes", "families", "lengths"))
    parser.add_argument(
        "--steps", type=int, default=None, help="processes: 120; families: 4; lengths: 6 (timed)"
    )
    parser.add_argument("--threads", type=int, default=2, help="families, lengths: torch threads")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/train_<q>.json)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.question == "processes":
        args.steps = args.steps or 120
        result = processes(args)
    elif args.question == "lengths":
        args.steps = args.steps or 6
        result = lengths(args)
    else:
        args.steps = args.steps or 4
        result = families(args)
    out = Path(args.out or RESULTS / f"train_{args.question}.json")
    atomic_write_json(out, result)
    if args.question == "families":
        _plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
