"""Train a student on the verified rationales of a trace store: one recipe, read top to bottom.

    nestling train --run runs/x --student tiny --objective multitask --steps 600
    nestling train --run runs/x --student "hf:smollm2?keep_layers=8" --steps 150 --lr 1e-4
    accelerate launch -m nestling train --run runs/x --student small   # same code on GPUs (DDP)

Reads RUN/traces/kept.jsonl (+ questions.jsonl, to drop any held-out question) and writes
RUN/students/<name>/model/ (save_pretrained) and RUN/students/<name>/manifest.json (stage "train").
Checkpoints go to RUN/students/<name>/checkpoints/step-NNNNNN/; ``--resume`` continues from the newest
complete one and reaches the same weights as an uninterrupted run, because the data order is a pure
function of (seed, step) and the learning rate a pure function of the step.

Objectives (the student's format is serve.prompting, the one the runtime and the exports use):
  cot          explain prompt -> "Step 1: ...\\nAnswer: X" + eos
  answer-only  answer prompt  -> " X" + eos                               (the baseline)
  multitask    both, every example twice (Distilling Step-by-Step, Hsieh et al. 2023, decoder-only form):
               loss = alpha * answer loss + (1 - alpha) * explain loss
The loss covers target tokens only (the prompt is context, not something to imitate).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestling.serve.config import check
from nestling.serve.errors import NestlingError
from nestling.serve.manifest import atomic_write_json, is_fresh, sha256_file, write_manifest
from nestling.serve.manifest import read_jsonl as _read_jsonl
from nestling.serve.prompting import answer_target, explain_target, student_prompt

log = logging.getLogger(__name__)

OBJECTIVES = ("cot", "multitask", "answer-only")

# Measured defaults per student kind (steps, lr, batch, warmup, trainable layers), used for unset flags.
# Presets: 600 steps of 16 at 3e-3 (~1 min at ~7,000 tokens/s on 2 free threads).
PRESET_RECIPE = {"steps": 600, "lr": 3e-3, "batch_size": 16, "warmup": 30, "train_layers": 0}
# Pretrained (hf:smollm2): 40 steps of 8 (a third of an epoch of ~1,000 multitask examples), every layer,
# lr 5e-5; the model knows the facts and mostly learns the nestling format. Measured on 100 held-out
# questions: 77% vs 57% when only the top 6 layers trained at 2e-4 for 60 steps; ~260 s on one contended
# thread.
PRETRAINED_RECIPE = {"steps": 40, "lr": 5e-5, "batch_size": 8, "warmup": 4, "train_layers": 0}
# Fields that change how a run executes but not what it computes: excluded from resume/freshness checks.
# `run` too: the traces it holds are compared by content (fingerprint_inputs), so a moved or respelled run
# directory is the same training.
RUNTIME_FIELDS = ("run", "threads", "resume", "checkpoint_every", "keep_checkpoints", "progress")


@dataclass
class TrainConfig:
    """`nestling train`: one student on one run directory's traces."""

    run: str = field(default="runs/default", metadata={"help": "run directory holding traces/"})
    student: str = field(
        default="tiny",
        metadata={"help": "student spec: nano|tiny|small|hf:smollm2|hf:PATH, options ?keep_layers=N&seed=N"},
    )
    objective: str = field(
        default="multitask", metadata={"help": "cot | multitask | answer-only", "choices": OBJECTIVES}
    )
    alpha: float = field(default=0.5, metadata={"help": "multitask weight of the answer loss (0..1)"})
    steps: int | None = field(
        default=None, metadata={"help": "optimizer steps (default: the student's recipe)"}
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "examples per micro-batch, all processes (default: the recipe's)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the recipe's)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of lr"})
    warmup: int | None = field(default=None, metadata={"help": "linear warmup steps (default: the recipe's)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    max_len: int = field(default=192, metadata={"help": "longest example in tokens; longer ones are dropped"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order"})
    train_layers: int | None = field(
        default=None,
        metadata={"help": "train only the top N decoder layers + final norm, embeddings frozen (0 = all)"},
    )
    kd_alpha: float = field(
        default=0.0,
        metadata={"help": "white-box KD weight: KL to the teacher's logits (needs a shared tokenizer)"},
    )
    kd_teacher: str = field(default="hf:smollm2", metadata={"help": "logit teacher for --kd-alpha > 0"})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature for KD"})
    name: str | None = field(default=None, metadata={"help": "student directory name (default: from spec)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = none)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk"})
    resume: bool = field(default=True, metadata={"help": "continue from the newest complete checkpoint"})
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads (default min(2, cores): OpenMP spins under contention)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        from nestling.distill.students import parse_student_spec

        # Unset fields come from the student's recipe: a from-scratch preset wants lr 3e-3 and hundreds of
        # steps, a pretrained model a gentle 5e-5 for a few dozen (3e-3 would wipe out what it knows).
        recipe = PRETRAINED_RECIPE if parse_student_spec(self.student).pretrained else PRESET_RECIPE
        for key, value in recipe.items():
            if getattr(self, key) is None and key != "warmup":
                setattr(self, key, value)
        if self.warmup is None:
            self.warmup = min(recipe["warmup"], self.steps // 5)
        check(
            self.objective in OBJECTIVES,
            f"--objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}",
        )
        check(0.0 <= self.alpha <= 1.0, f"--alpha {self.alpha}: must be in [0, 1]")
        check(self.steps > 0, f"--steps {self.steps}: must be > 0")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.grad_accum > 0, f"--grad-accum {self.grad_accum}: must be > 0")
        check(self.lr > 0, f"--lr {self.lr}: must be > 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        check(self.warmup >= 0, f"--warmup {self.warmup}: must be >= 0")
        check(self.max_len >= 8, f"--max-len {self.max_len}: must be >= 8")
        check(self.train_layers >= 0, f"--train-layers {self.train_layers}: must be >= 0 (0 = all)")
        check(0.0 <= self.kd_alpha <= 1.0, f"--kd-alpha {self.kd_alpha}: must be in [0, 1]")
        check(self.kd_temperature > 0, f"--kd-temperature {self.kd_temperature}: must be > 0")
        check(self.checkpoint_every >= 0, f"--checkpoint-every {self.checkpoint_every}: must be >= 0")
        check(self.keep_checkpoints >= 1, f"--keep-checkpoints {self.keep_checkpoints}: must be >= 1")
        check(self.threads is None or self.threads > 0, f"--threads {self.threads}: must be > 0")

    def recipe(self) -> dict[str, Any]:
        """The fields that decide the trained weights (what resume and freshness compare)."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}


# ---- data ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return _read_jsonl(path, fix=f"run `nestling traces --out {path.parent.parent}` first")


def training_rows(run: Path) -> list[dict]:
    """Kept rows whose question is in the train split; NestlingError when nothing verified is left."""
    kept_path, questions_path = run / "traces" / "kept.jsonl", run / "traces" / "questions.jsonl"
    kept = read_jsonl(kept_path)
    heldout: set[str] = set()
    if questions_path.is_file():
        heldout = {str(r["id"]) for r in read_jsonl(questions_path) if r.get("split") == "heldout"}
    rows = []
    for r in kept:
        if not isinstance(r, dict) or not all(k in r for k in ("qid", "question", "answer", "steps")):
            raise NestlingError(f"{kept_path}: row {r!r:.80} lacks qid/question/answer/steps; re-run traces")
        if str(r["qid"]) in heldout:
            continue  # never train on an evaluation question, whatever the filter kept
        if not str(r["answer"]).strip():
            continue
        rows.append(r)
    if not rows:
        raise NestlingError(
            f"{kept_path}: no verified training rows (the teacher got nothing right, or every row is held "
            "out); use an easier task, more samples (--samples) or more questions (--n)"
        )
    return rows


@dataclass
class Example:
    ids: list[int]  # prompt + target + eos
    n_prompt: int  # tokens of context, excluded from the loss
    weight: float  # the objective's weight for this example (multitask: alpha or 1 - alpha)


def build_examples(
    rows: list[dict], tokenizer: Any, objective: str, alpha: float, max_len: int
) -> list[Example]:
    """Tokenize prompt and target separately, exactly as the runtime sees them: it tokenizes the prompt and
    generates the rest, so a merge across the boundary would be a token the student never has to produce."""
    pairs: list[tuple[str, str, float]] = []
    for r in rows:
        q, a = str(r["question"]), str(r["answer"])
        if objective in ("cot", "multitask"):
            w = 1.0 if objective == "cot" else 1.0 - alpha
            pairs.append((student_prompt(q, explain=True), explain_target(list(r["steps"]), a), w))
        if objective in ("answer-only", "multitask"):
            w = 1.0 if objective == "answer-only" else alpha
            pairs.append((student_prompt(q, explain=False), answer_target(a), w))
    out, dropped = [], 0
    eos = tokenizer.eos_token_id
    for prompt, target, w in pairs:
        if w == 0.0:
            continue
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(t) > max_len:
            dropped += 1
            continue
        out.append(Example(p + t, len(p), w))
    if dropped:
        log.info("dropped %d of %d examples longer than --max-len %d", dropped, len(pairs), max_len)
    if not out:
        raise NestlingError(f"every training example is longer than --max-len {max_len}; raise it")
    return out


def batch_indices(step: int, micro: int, cfg: TrainConfig, n: int) -> list[int]:
    """Example indices of micro-batch `micro` of optimizer step `step`: a pure function of (seed, step).

    Epoch e visits a permutation seeded by (seed, e); that is what makes a resumed run identical.
    """
    import torch

    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    out = []
    perms: dict[int, list[int]] = {}
    for k in range(start, start + cfg.batch_size):
        epoch, pos = divmod(k, n)
        if epoch not in perms:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][pos])
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded batch; labels are -100 on the prompt and the padding."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, e.n_prompt : len(e.ids)] = torch.tensor(e.ids[e.n_prompt :])
        mask[i, : len(e.ids)] = 1
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)  # (B,)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def target_positions(labels: Any) -> Any:
    """Sequence positions whose logits predict a target token: from one before the earliest target to the
    end. The prompt's logits are never needed, and with SmolLM2's 49k vocabulary the output layer is a
    large share of the cost, so the model computes logits only here (``logits_to_keep``)."""
    import torch

    cols = (labels[:, 1:] != -100).any(0).nonzero()
    start = int(cols.min()) if len(cols) else 0
    return torch.arange(start, labels.shape[1] - 1, device=labels.device)


def weighted_loss(
    logits: Any, labels: Any, weights: Any, teacher_logits: Any = None, cfg: TrainConfig | None = None
) -> Any:
    """Mean over examples of (objective weight x mean target-token loss), normalised by the weights.

    `logits` (B, K, V) predict `labels` (B, K), the tokens one position later. Per-example means keep a
    long rationale from drowning a one-token answer in the multitask mix. With teacher logits, the token
    loss is (1 - kd) * CE + kd * T^2 * KL(teacher || student).
    """
    import torch.nn.functional as F

    logits = logits.float()
    mask = (labels != -100).float()  # (B, K)
    tok_loss = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, K)
    if teacher_logits is not None and cfg is not None and cfg.kd_alpha > 0:
        temp = cfg.kd_temperature
        t = F.log_softmax(teacher_logits.float() / temp, dim=-1)
        s = F.log_softmax(logits / temp, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1) * temp**2  # (B, K)
        tok_loss = (1 - cfg.kd_alpha) * tok_loss + cfg.kd_alpha * kl
    per_example = (tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    w = weights.to(per_example.device)
    return (per_example * w).sum() / w.sum().clamp(min=1e-8)


def freeze_below(model: Any, train_layers: int) -> list:
    """Trainable parameters: all, or only the top `train_layers` decoder layers and the final norm.

    Backpropagation then stops at the lowest trainable layer, so a 30-layer pretrained student trains at
    roughly the cost of its forward pass while keeping what its frozen layers know.
    """
    if train_layers <= 0:
        return [p for p in model.parameters() if p.requires_grad]
    layers = model.model.layers
    if train_layers > len(layers):
        raise NestlingError(f"--train-layers {train_layers}: the student has only {len(layers)} layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - train_layers :]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ---- checkpoints ---------------------------------------------------------------------------------------


def newest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest step-* directory that finished writing (temp dirs never match the pattern)."""
    done = [p for p in ckpt_root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(
    root: Path, step: int, model: Any, tok: Any, optimizer: Any, state: dict, keep: int
) -> Path:
    """Write step-NNNNNN under a temp name, then rename: a kill leaves nothing or a whole checkpoint."""
    import torch

    from nestling.distill.students import save_student

    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(model, tok, tmp)
    torch.save(
        {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt"
    )
    atomic_write_json(tmp / "trainer_state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _threads(cfg: TrainConfig) -> None:
    """CPU only: min(2, cores) threads unless told. With other processes on the cores, OpenMP's spinning
    made 2-thread PyTorch ~30x slower here (FIELD-NOTES); more threads than cores only adds spinning."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.threads or max(1, min(2, os.cpu_count() or 1)))


def fingerprint_inputs(run: Path) -> dict[str, str]:
    traces = run / "traces"
    return {
        name: sha256_file(traces / name)
        for name in ("kept.jsonl", "questions.jsonl")
        if (traces / name).is_file()
    }


# ---- the recipe ----------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """setup -> train -> save; returns RUN/students/<name>. Resumable; runs under `accelerate launch`."""
    import torch

    from nestling.distill.students import count_params, init_student, load_student, parse_student_spec, save_student

    # -- setup ------------------------------------------------------------------------------------------
    run = Path(cfg.run)
    spec = parse_student_spec(cfg.student)
    name = cfg.name or spec.name
    out = run / "students" / name
    ckpt_root = out / "checkpoints"
    rows = training_rows(run)
    traces_sha = fingerprint_inputs(run)
    if is_fresh(out, "train", cfg.recipe(), traces_sha):
        log.info("%s is up to date (same recipe and traces); skipping", out)
        return out
    _threads(cfg)
    try:
        from accelerate import Accelerator

        accel = Accelerator()
    except ImportError:  # plain single-process training
        accel = None
    is_main = accel is None or accel.is_main_process
    rank, world = (accel.process_index, accel.num_processes) if accel else (0, 1)
    check(cfg.batch_size % world == 0, f"--batch-size {cfg.batch_size}: must divide by {world} processes")

    state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "losses": []}
    ckpt = newest_checkpoint(ckpt_root) if cfg.resume else None
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        if saved.get("inputs") != traces_sha:
            # Traces changed since the checkpoint: its weights and tokenizer belong to other data.
            log.warning("%s: trained on other traces; starting over instead of resuming", ckpt)
            ckpt = None
    if ckpt is not None:
        if saved.get("recipe") != json.loads(json.dumps(cfg.recipe())):
            raise NestlingError(
                f"{ckpt}: written with a different recipe; pass the same flags, --no-resume, "
                f"or remove {ckpt_root}"
            )
        model, tok = load_student(ckpt)
        state = saved
        log.info("resuming %s from %s", name, ckpt.name)
    else:
        texts = [
            student_prompt(r["question"]) + explain_target(list(r["steps"]), str(r["answer"])) for r in rows
        ]
        model, tok = init_student(spec, texts, seed=cfg.seed + spec.seed)
    if cfg.kd_alpha > 0 and not spec.pretrained:
        raise NestlingError("--kd-alpha needs a student sharing the teacher's tokenizer, e.g. hf:smollm2")
    examples = build_examples(rows, tok, cfg.objective, cfg.alpha, cfg.max_len)
    params = count_params(model)
    log.info("student %s: %s, %.2fM parameters, %d examples", name, cfg.student, params / 1e6, len(examples))

    teacher = None
    if cfg.kd_alpha > 0:
        from nestling.distill.students import load_pretrained

        teacher, teacher_tok = load_pretrained(cfg.kd_teacher)
        if teacher_tok.get_vocab() != tok.get_vocab():
            raise NestlingError(f"--kd-teacher {cfg.kd_teacher}: its tokenizer differs from the student's")
        teacher.eval().requires_grad_(False)

    device = accel.device if accel else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    model.config.use_cache = False
    trainable = freeze_below(model, cfg.train_layers)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if ckpt is not None:
        extra = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["torch_rng"])
    else:
        torch.manual_seed(cfg.seed)
    if accel:
        model, optimizer = accel.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(device)

    # -- train ------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=state["step"],
        desc=f"train {name}",
        disable=not (is_main and cfg.progress),
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    t0, tokens0 = time.perf_counter(), state["tokens"]
    seconds0 = state["seconds"]
    for step in range(state["step"], cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step, micro, cfg, len(examples))[rank::world]
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in idx], tok.pad_token_id).items()
            }
            sync = micro == cfg.grad_accum - 1 or accel is None
            keep = target_positions(batch["labels"])  # (K,)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with nullcontext() if sync else accel.no_sync(model):
                logits = model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(**inputs, logits_to_keep=keep).logits
                loss = weighted_loss(logits, batch["labels"][:, keep + 1], batch["weights"], t_logits, cfg)
                scaled = loss / cfg.grad_accum
                accel.backward(scaled) if accel else scaled.backward()
            step_loss += loss.item() / cfg.grad_accum
            state["tokens"] += int(batch["attention_mask"].sum().item()) * world
        if cfg.grad_clip > 0:
            params_ = trainable
            accel.clip_grad_norm_(params_, cfg.grad_clip) if accel else torch.nn.utils.clip_grad_norm_(
                params_, cfg.grad_clip
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["losses"].append(round(step_loss, 5))
        elapsed = time.perf_counter() - t0
        state["seconds"] = seconds0 + elapsed
        tps = (state["tokens"] - tokens0) / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.1e}")
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < cfg.steps:
            if accel:
                accel.wait_for_everyone()
            if is_main:
                unwrapped = accel.unwrap_model(model) if accel else model
                state["recipe"] = cfg.recipe()
                state["inputs"] = traces_sha
                save_checkpoint(
                    ckpt_root, state["step"], unwrapped, tok, optimizer, state, cfg.keep_checkpoints
                )
    bar.close()

    # -- save -------------------------------------------------------------------------------------------
    if accel:
        accel.wait_for_everyone()
    if is_main:
        unwrapped = accel.unwrap_model(model) if accel else model
        unwrapped.config.use_cache = True
        unwrapped.eval()
        tmp = out / f".tmp-model-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_student(unwrapped.to("cpu"), tok, tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        os.replace(tmp, out / "model")
        tail = state["losses"][-20:]
        metrics = {
            "params": params,
            "steps": state["step"],
            "examples": len(examples),
            "rows": len(rows),
            "train_tokens": state["tokens"],
            "train_seconds": round(state["seconds"], 2),
            "train_tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
            "initial_loss": round(sum(state["losses"][:5]) / max(1, len(state["losses"][:5])), 4),
            "final_loss": round(sum(tail) / max(1, len(tail)), 4),
            "device": str(device),
            "processes": world,
        }
        write_manifest(
            out,
            stage="train",
            config=cfg.recipe(),
            inputs=traces_sha,
            files=["model"],
            metrics=metrics,
            student=spec.to_dict(),
            name=name,
        )
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the final model supersedes them
        log.info(
            "saved %s (%.2fM params, %.0f tokens/s)",
            out / "model",
            params / 1e6,
            metrics["train_tokens_per_s"],
        )
    return out
