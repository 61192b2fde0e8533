"""Train a student on the verified rationales of a trace store: one recipe, read top to bottom.

    nestling train --run runs/x --student tiny --objective multitask --steps 600
    nestling train --run runs/x --student "gguf:smollm2?keep_layers=8" --steps 150 --lr 1e-4
    nestling train --run runs/x --student hf:DIR --lora --steps 200       # LoRA adapters, merged on save
    torchrun --nproc_per_node 2 -m nestling -- train --run runs/x        # DDP: gloo on CPU, NCCL on GPU
    accelerate launch --multi_gpu --num_processes 2 -m nestling train --run runs/x   # the same

Reads RUN/traces/kept.jsonl (+ questions.jsonl, to drop any held-out question) and writes
RUN/students/<name>/model/ (save_pretrained) and RUN/students/<name>/manifest.json (stage "train").
Checkpoints go to RUN/students/<name>/checkpoints/step-NNNNNN/ (distill.checkpoint); ``--resume``
continues from the newest complete one and reaches the same weights as an uninterrupted run, because the
data order is a pure function of (seed, step) and the learning rate a pure function of the step.

The recipe is setup -> fit -> save. Under a launcher every process builds the same student, takes its
share (rank::world) of each global batch, and DDP averages the gradients; the loss is normalised by the
global batch's weights, so N processes compute the single-process step. Only rank 0 writes.

Objectives (the student's format is core.prompting, the one the runtime and the exports use):
  cot          explain prompt -> "Step 1: ...\\nAnswer: X" + eos
  answer-only  answer prompt  -> " X" + eos                               (the baseline)
  multitask    both, every example twice (Distilling Step-by-Step, Hsieh et al. 2023, decoder-only form):
               loss = alpha * answer loss + (1 - alpha) * explain loss
The loss covers target tokens only (the prompt is context, not something to imitate).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestling.distill import checkpoint
from nestling.distill.accel import PRECISIONS, Runtime, autocast, barrier, resolve_precision, setup_runtime

from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.manifest import is_fresh, sha256_file, write_manifest
from nestling.core.manifest import read_jsonl as _read_jsonl
from nestling.core.prompting import answer_target, explain_target, student_prompt
from nestling.core.rundir import RunDir

log = logging.getLogger(__name__)

OBJECTIVES = ("cot", "multitask", "answer-only")

# Measured defaults per student kind (steps, lr, batch, warmup, trainable layers), used for unset flags.
# Presets: 600 steps of 16 at 3e-3 (~1 min at ~7,000 tokens/s on 2 free threads).
PRESET_RECIPE = {"steps": 600, "lr": 3e-3, "batch_size": 16, "warmup": 30, "train_layers": 0}
# Pretrained (gguf:smollm2): 120 steps of 8, every layer, lr 5e-5; the model knows the facts and mostly learns
# the nestling format. 40 steps (a third of an epoch) fell well short of 120 (about 3 epochs); training only
# the top layers lost to training every layer. Figures: benchmarks/results/students_default.json and the
# committed default run (benchmarks/results/default_run/report.md).
PRETRAINED_RECIPE = {"steps": 120, "lr": 5e-5, "batch_size": 8, "warmup": 12, "train_layers": 0}
# Fields that change how a run executes but not what it computes: excluded from resume/freshness checks.
# `run` too: the traces it holds are compared by content (fingerprint_inputs), so a moved or respelled run
# directory is the same training.
RUNTIME_FIELDS = (
    "run",
    "threads",
    "resume",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "grad_checkpointing",
)
# A LoRA run of a pretrained student: adapters need a larger step than full fine-tuning's 5e-5 (2e-4 is the
# common LoRA default, Dettmers et al. 2023; not tuned here).
LORA_LR = 2e-4


@dataclass
class TrainConfig:
    """`nestling train`: one student on one run directory's traces."""

    run: str = field(default="runs/default", metadata={"help": "run directory holding traces/"})
    student: str = field(
        default="tiny",
        metadata={"help": "student spec: nano|tiny|small|gguf:smollm2|hf:DIR, options ?keep_layers=N&seed=N"},
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
    max_minutes: float = field(
        default=0.0,
        metadata={
            "help": "wall-clock budget: --steps is cut to what fits at the speed measured every 8 steps, "
            "re-planned to the end (never under min(steps, 20)); warmup and schedule follow the cut "
            "(0 = no budget)"
        },
    )
    max_len: int = field(default=192, metadata={"help": "longest example in tokens"})
    truncate: bool = field(
        default=True,
        metadata={"help": "cut examples longer than --max-len at --max-len (--no-truncate drops them)"},
    )
    seed: int = field(default=0, metadata={"help": "seed for init, data order"})
    train_layers: int | None = field(
        default=None,
        metadata={"help": "train only the top N decoder layers + final norm, embeddings frozen (0 = all)"},
    )
    kd_alpha: float = field(
        default=0.0,
        metadata={"help": "white-box KD weight: KL to the teacher's logits (needs a shared tokenizer)"},
    )
    kd_teacher: str = field(default="gguf:smollm2", metadata={"help": "logit teacher for --kd-alpha > 0"})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature for KD"})
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "share of steps trained on-policy: the student samples, --kd-teacher scores every token "
            "(GKD's lambda; 0 = off-policy KD/CE only, 1 = on-policy only)"
        },
    )
    beta: float = field(
        default=0.5,
        metadata={"help": "on-policy generalized JSD: 0 = forward KL, 1 = reverse KL (GKD's beta)"},
    )
    sample_temperature: float = field(
        default=1.0, metadata={"help": "temperature of the student's on-policy samples"}
    )
    max_new_tokens: int = field(default=96, metadata={"help": "longest on-policy sample in tokens"})
    kd_top_k: int = field(
        default=0,
        metadata={
            "help": "on-policy: the teacher's top-k tokens only (0 = its full distribution; a llamacpp: or "
            "openai: teacher scores top-k only and uses 20)"
        },
    )
    onpolicy_fresh: int = field(
        default=0,
        metadata={"help": "fresh task questions (never held-out) added to the on-policy prompts"},
    )
    lora: bool = field(
        default=False, metadata={"help": "train LoRA adapters (peft) instead of every weight; merged on save"}
    )
    lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank (default: the family's)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x rank)"})
    lora_targets: list[str] | None = field(
        default=None,
        metadata={"help": "module names to adapt, e.g. q_proj,v_proj (default: the family's linear layers)"},
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto | fp32 | bf16 autocast (auto: bf16 on GPUs that have it and on AMX CPUs)",
            "choices": PRECISIONS,
        },
    )
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward: less memory, ~1/3 more compute"}
    )
    name: str | None = field(default=None, metadata={"help": "student directory name (default: from spec)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = none)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk"})
    resume: bool = field(default=True, metadata={"help": "continue from the newest complete checkpoint"})
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads (default min(2, cores): OpenMP spins under contention)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @functools.cached_property
    def spec(self) -> Any:
        """The parsed --student (a students.StudentSpec), parsed once per config."""
        from nestling.distill.students import parse_student_spec

        return parse_student_spec(self.student)

    def __post_init__(self) -> None:
        # Unset fields come from the student's recipe: a from-scratch preset wants lr 3e-3 and hundreds of
        # steps, a pretrained model a gentle 5e-5 for a few dozen (3e-3 would wipe out what it knows).
        recipe = PRETRAINED_RECIPE if self.spec.pretrained else PRESET_RECIPE
        if self.lora and self.lr is None and recipe is PRETRAINED_RECIPE:
            self.lr = LORA_LR
        for key, value in recipe.items():
            if getattr(self, key) is None and key != "warmup":
                setattr(self, key, value)
        if isinstance(self.lora_targets, str):
            self.lora_targets = [self.lora_targets]
        if self.lora_targets:
            self.lora_targets = [
                t.strip() for item in self.lora_targets for t in item.split(",") if t.strip()
            ]
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
        check(self.max_minutes >= 0, f"--max-minutes {self.max_minutes}: must be >= 0 (0 = no budget)")
        check(self.lr > 0, f"--lr {self.lr}: must be > 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        check(self.warmup >= 0, f"--warmup {self.warmup}: must be >= 0")
        check(self.max_len >= 8, f"--max-len {self.max_len}: must be >= 8")
        check(self.train_layers >= 0, f"--train-layers {self.train_layers}: must be >= 0 (0 = all)")
        check(0.0 <= self.kd_alpha <= 1.0, f"--kd-alpha {self.kd_alpha}: must be in [0, 1]")
        check(self.kd_temperature > 0, f"--kd-temperature {self.kd_temperature}: must be > 0")
        check(0.0 <= self.lmbda <= 1.0, f"--lmbda {self.lmbda}: must be in [0, 1]")
        check(0.0 <= self.beta <= 1.0, f"--beta {self.beta}: must be in [0, 1]")
        check(self.sample_temperature > 0, f"--sample-temperature {self.sample_temperature}: must be > 0")
        check(self.max_new_tokens > 0, f"--max-new-tokens {self.max_new_tokens}: must be > 0")
        check(self.kd_top_k >= 0, f"--kd-top-k {self.kd_top_k}: must be >= 0")
        check(self.onpolicy_fresh >= 0, f"--onpolicy-fresh {self.onpolicy_fresh}: must be >= 0")
        check(self.checkpoint_every >= 0, f"--checkpoint-every {self.checkpoint_every}: must be >= 0")
        check(self.keep_checkpoints >= 1, f"--keep-checkpoints {self.keep_checkpoints}: must be >= 1")
        check(self.threads is None or self.threads > 0, f"--threads {self.threads}: must be > 0")
        check(
            self.precision in PRECISIONS,
            f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}",
        )
        check(
            not (self.lora and self.train_layers), "--lora and --train-layers: choose one way to train less"
        )
        check(self.lora_rank is None or self.lora_rank > 0, f"--lora-rank {self.lora_rank}: must be > 0")
        check(self.lora_alpha is None or self.lora_alpha > 0, f"--lora-alpha {self.lora_alpha}: must be > 0")

    def recipe(self) -> dict[str, Any]:
        """The fields that decide the trained weights (what resume and freshness compare)."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}


# ---- data ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return _read_jsonl(path, fix=f"run `nestling traces --out {path.parent.parent}` first")


def _questions(run: Path) -> list[dict]:
    """The run's question rows, none when it has no questions file (a run made of handed rows only)."""
    rd = RunDir(run)
    return rd.questions() if rd.questions_file.is_file() else []


def training_rows(run: Path, rows: list[dict] | None = None) -> list[dict]:
    """Verified rows whose question is in the train split: the run's kept traces, or `rows` a stage hands over
    instead; NestlingError when nothing is left."""
    rd = RunDir(run)
    kept_path = rd.kept_file
    where = str(kept_path) if rows is None else f"{run}: a training row"
    if rows is None:
        rows = read_jsonl(kept_path)
    heldout = {str(r["id"]) for r in rd.heldout()} if rd.questions_file.is_file() else set()
    keep = []
    for r in rows:
        if not isinstance(r, dict) or not all(k in r for k in ("qid", "question", "answer", "steps")):
            raise NestlingError(f"{where}: row {r!r:.80} lacks qid/question/answer/steps; re-run traces")
        if str(r["qid"]) in heldout:
            continue  # never train on an evaluation question, whatever the filter kept
        if not str(r["answer"]).strip():
            continue
        keep.append(r)
    if not keep:
        raise NestlingError(
            f"{where}: no verified training rows (the teacher got nothing right, or every row is held "
            "out); use an easier task, more samples (--samples) or more questions (--n)"
        )
    return keep


@dataclass
class Example:
    ids: list[int]  # prompt + target + eos, cut at --max-len
    n_prompt: int  # tokens of context, excluded from the loss
    weight: float  # the objective's weight for this example (multitask: alpha or 1 - alpha)
    cut: int = 0  # target tokens cut off by --max-len


def objective_pairs(rows: list[dict], objective: str, alpha: float) -> list[tuple[str, str, float]]:
    """(prompt, target, weight) for every row and every part of the objective with a non-zero weight."""
    pairs: list[tuple[str, str, float]] = []
    for r in rows:
        q, a = str(r["question"]), str(r["answer"])
        if objective in ("cot", "multitask"):
            w = 1.0 if objective == "cot" else 1.0 - alpha
            pairs.append((student_prompt(q, explain=True), explain_target(list(r["steps"]), a), w))
        if objective in ("answer-only", "multitask"):
            w = 1.0 if objective == "answer-only" else alpha
            pairs.append((student_prompt(q, explain=False), answer_target(a), w))
    return [p for p in pairs if p[2] != 0.0]


def build_examples(
    rows: list[dict], tokenizer: Any, objective: str, alpha: float, max_len: int, truncate: bool = True
) -> list[Example]:
    """Tokenize prompt and target separately, exactly as the runtime sees them: it tokenizes the prompt and
    generates the rest, so a merge across the boundary would be a token the student never has to produce.

    An example longer than `max_len` keeps its first `max_len` tokens (the start of a long chain is still
    worth learning; ``cut`` counts what went) or, with truncate=False, is dropped. One whose prompt alone
    fills `max_len` leaves nothing to learn and is always dropped.
    """
    pairs = objective_pairs(rows, objective, alpha)
    out: list[Example] = []
    eos = tokenizer.eos_token_id
    for prompt, target, w in pairs:
        p = tokenizer(prompt)["input_ids"]
        ids = p + tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        cut = max(0, len(ids) - max_len)
        if cut and (not truncate or len(p) >= max_len):
            continue
        out.append(Example(ids[: len(ids) - cut], len(p), w, cut))
    dropped, cut = len(pairs) - len(out), sum(e.cut > 0 for e in out)
    if dropped or cut:
        log.info("--max-len %d: %d of %d examples cut, %d dropped", max_len, cut, len(pairs), dropped)
    if not out:
        raise NestlingError(f"every training example is longer than --max-len {max_len}; raise it")
    return out


def onpolicy_questions(run: Path, rows: list[dict], n_fresh: int, seed: int) -> list[str]:
    """What the student samples on: the training rows' questions, the train split's, and `n_fresh` fresh
    questions from the task's generator; never a held-out question (by id, text or expression)."""
    from nestling.distill.evaluate import traces_config
    from nestling.distill.fresh import draw_fresh, held_keys
    from nestling.distill.tasks import normalize_question

    questions = _questions(run)
    held = held_keys(questions)
    texts = [str(r["question"]) for r in rows]
    texts += [str(r["question"]) for r in questions if r.get("split") == "train"]
    if n_fresh:
        task = str(traces_config(run).get("task") or (questions or rows)[0]["task"])
        texts += [ex.question for ex in draw_fresh(task, questions, n_fresh, seed)]
    seen: set[str] = set()
    out = []
    for q in texts:
        key = normalize_question(q)
        if key not in seen and key not in held:
            seen.add(key)
            out.append(q)
    return out


def onpolicy_prompts(
    questions: list[str], tokenizer: Any, objective: str, alpha: float, max_len: int
) -> list[Example]:
    """The prompts of every objective mode (weighted as the objective weighs it), as Examples holding the
    prompt alone: the student writes the rest."""
    rows = [{"question": q, "answer": "", "steps": []} for q in questions]
    out = []
    for prompt, _target, w in objective_pairs(rows, objective, alpha):
        p = tokenizer(prompt)["input_ids"]
        if len(p) < max_len:
            out.append(Example(p, len(p), w))
    if not out:
        raise NestlingError(f"no on-policy prompt fits --max-len {max_len}; raise it")
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


def lr_at(
    step: int,
    cfg: TrainConfig,
    total: int | None = None,
    warmup: int | None = None,
    anchor: tuple[int, float] | None = None,
) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step (`total` and
    `warmup`: the budget's cut of cfg.steps and cfg.warmup, when there is one). `anchor` (step, progress):
    where the budget last re-planned `total`, so the cosine goes on from the progress it had reached there
    and spreads the rest over the new plan, without a jump in the learning rate."""
    warmup = cfg.warmup if warmup is None else warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = cosine_progress(step, total or cfg.steps, warmup, anchor)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def cosine_progress(step: int, total: int, warmup: int, anchor: tuple[int, float] | None) -> float:
    """How far along the cosine `step` is (0 at the end of warmup, 1 at `total`)."""
    at, done = anchor or (warmup, 0.0)
    return min(1.0, done + (1.0 - done) * max(0, step - at) / max(1, total - at))


def target_positions(labels: Any) -> Any:
    """Sequence positions whose logits predict a target token: from one before the earliest target to the
    end. The prompt's logits are never needed, and with SmolLM2's 49k vocabulary the output layer is a
    large share of the cost, so the model computes logits only here (``logits_to_keep``)."""
    import torch

    cols = (labels[:, 1:] != -100).any(0).nonzero()
    start = int(cols.min()) if len(cols) else 0
    return torch.arange(start, labels.shape[1] - 1, device=labels.device)


def weighted_loss(
    logits: Any,
    labels: Any,
    weights: Any,
    teacher_logits: Any = None,
    cfg: TrainConfig | None = None,
    total_weight: Any = None,
) -> Any:
    """Mean over examples of (objective weight x mean target-token loss), normalised by the weights, or by
    `total_weight` when this batch is one process's share of a larger one.

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
    total = w.sum() if total_weight is None else total_weight.to(per_example.device)
    return (per_example * w).sum() / total.clamp(min=1e-8)


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


def fingerprint_inputs(run: Path) -> dict[str, str]:
    traces = RunDir(run).traces
    return {
        name: sha256_file(traces / name)
        for name in ("kept.jsonl", "questions.jsonl")
        if (traces / name).is_file()
    }


def fingerprint_rows(rows: list[dict]) -> str:
    blob = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---- setup ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything setup() builds and fit()/save() use."""

    cfg: TrainConfig
    rt: Runtime
    name: str
    spec: Any  # students.StudentSpec
    out: Path
    rows: list[dict]
    inputs: dict[str, str]  # sha256 of the traces
    model: Any  # what runs forward/backward: the student, peft-wrapped and/or DDP-wrapped
    student: Any  # the same weights unwrapped from DDP (a peft model under --lora)
    tok: Any
    examples: list[Example]
    optimizer: Any
    trainable: list
    dtype: Any  # autocast dtype, None for fp32
    teacher: Any = None  # a transformers model (full logits) or an onpolicy.TokenScorer
    prompts: list[Example] = field(default_factory=list)  # what on-policy steps sample from
    state: dict[str, Any] = field(default_factory=dict)  # step, tokens, seconds, losses: the sidecar

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def student_texts(rows: list[dict]) -> list[str]:
    """What a from-scratch preset's tokenizer is trained on."""
    return [student_prompt(r["question"]) + explain_target(list(r["steps"]), str(r["answer"])) for r in rows]


def build_student(cfg: TrainConfig, spec: Any, rows: list[dict], ckpt: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer): from the checkpoint, or freshly initialised; LoRA adapters added under --lora."""
    import torch
    from nestling.distill.lora import add_lora, lora_recipe
    from nestling.distill.students import init_student, load_student

    if ckpt is not None and not cfg.lora:
        return load_student(ckpt)
    # A LoRA checkpoint holds only the adapter: the frozen base is rebuilt exactly as a fresh run builds it.
    model, tok = init_student(spec, student_texts(rows), seed=cfg.seed + spec.seed)
    if cfg.lora:
        recipe = lora_recipe(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        torch.manual_seed(cfg.seed)
        model = add_lora(model, recipe)
        if ckpt is not None:
            checkpoint.load_adapter(ckpt, model)
    return model, tok


def load_kd_teacher(cfg: TrainConfig, spec: Any, tok: Any) -> Any:
    """The logit teacher for --kd-alpha > 0 (None otherwise); it must share the student's vocabulary."""
    if cfg.kd_alpha <= 0 and cfg.lmbda <= 0:
        return None
    from nestling.distill.onpolicy import is_scorer_spec, load_scorer

    if is_scorer_spec(cfg.kd_teacher):
        if cfg.kd_alpha > 0:
            raise NestlingError(
                f"--kd-teacher {cfg.kd_teacher}: it scores on-policy samples only (--lmbda); --kd-alpha "
                "needs a transformers teacher (hf:DIR or gguf:smollm2)"
            )
        return load_scorer(cfg.kd_teacher, tok, n_threads=cfg.threads or 1)
    if not spec.pretrained:
        raise NestlingError(
            "--kd-alpha/--lmbda need a student sharing the teacher's tokenizer, e.g. gguf:smollm2"
        )
    from nestling.distill.students import load_pretrained

    teacher, teacher_tok = load_pretrained(cfg.kd_teacher)
    check_tokenizer_match(cfg.kd_teacher, teacher_tok, tok)
    return teacher.eval().requires_grad_(False)


def check_tokenizer_match(spec: str, teacher_tok: Any, tok: Any) -> None:
    """Full-logit KD compares distributions id by id: the vocabularies must be the same."""
    if teacher_tok.get_vocab() != tok.get_vocab():
        raise NestlingError(
            f"--kd-teacher {spec}: its tokenizer differs from the student's ({len(teacher_tok)} vs "
            f"{len(tok)} tokens); full-logit KD needs a shared tokenizer (a trim of the teacher's is not: "
            "use the trimmed source, as compress does)"
        )


def check_same_tokenizer(tok: Any, rt: Runtime) -> None:
    """Every rank must tokenize alike (each builds its own examples); a preset's BPE is trained per rank."""
    if not rt.distributed:
        return
    import torch.distributed as dist

    digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    seen: list[Any] = [None] * rt.world
    dist.all_gather_object(seen, digest)
    if len(set(seen)) != 1:
        raise NestlingError("the processes built different tokenizers; train once without the launcher")


def prepare_model(cfg: TrainConfig, model: Any, rt: Runtime) -> tuple[Any, list, Any]:
    """(model to run, trainable parameters, optimizer): on the device, frozen as asked, DDP when launched."""
    import torch

    model.to(rt.device).train()
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = (
        freeze_below(model, cfg.train_layers)
        if not cfg.lora
        else [p for p in model.parameters() if p.requires_grad]
    )
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)  # broadcasts rank 0's weights to all
    return model, trainable, optimizer


def setup(cfg: TrainConfig, rt: Runtime, rows: list[dict], inputs: dict[str, str], out: Path) -> Job:
    """Student, data, optimizer and state, from the newest checkpoint when resuming. Writes nothing."""
    import torch
    from nestling.distill.students import count_params

    spec = cfg.spec
    name = cfg.name or spec.name
    check(
        cfg.batch_size % rt.world == 0, f"--batch-size {cfg.batch_size}: must divide by {rt.world} processes"
    )
    ckpt = checkpoint.find_resumable(out / "checkpoints", cfg.recipe(), inputs) if cfg.resume else None
    student, tok = build_student(cfg, spec, rows, ckpt)
    teacher = load_kd_teacher(cfg, spec, tok)
    check_same_tokenizer(tok, rt)
    examples = build_examples(rows, tok, cfg.objective, cfg.alpha, cfg.max_len, cfg.truncate)
    prompts: list[Example] = []
    if cfg.lmbda > 0:
        questions = onpolicy_questions(Path(cfg.run), rows, cfg.onpolicy_fresh, cfg.seed)
        prompts = onpolicy_prompts(questions, tok, cfg.objective, cfg.alpha, cfg.max_len)
    log.info(
        "student %s: %s, %.2fM parameters, %d examples, %d process(es) on %s",
        name,
        cfg.student,
        count_params(student) / 1e6,
        len(examples),
        rt.world,
        rt.device,
    )
    model, trainable, optimizer = prepare_model(cfg, student, rt)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "losses": []}
    if ckpt is not None:
        checkpoint.load_optimizer(ckpt, optimizer)
        state = checkpoint.read_state(ckpt)
        log.info("resuming %s from %s", name, ckpt.name)
    else:
        torch.manual_seed(cfg.seed)
    if teacher is not None and hasattr(teacher, "to"):
        teacher.to(rt.device)
    return Job(
        cfg=cfg, rt=rt, name=name, spec=spec, out=out, rows=rows, inputs=inputs, model=model, student=student,
        tok=tok, examples=examples, optimizer=optimizer, trainable=trainable,
        dtype=resolve_precision(cfg.precision, rt.device), teacher=teacher, prompts=prompts, state=state,
    )  # fmt: skip


# ---- train ---------------------------------------------------------------------------------------------


def micro_step(job: Job, idx: list[int], sync: bool) -> float:
    """Forward and backward on this process's share of one micro-batch; returns its part of the global loss.

    The loss is normalised by the whole micro-batch's weights and multiplied by the world size, because DDP
    averages gradients over processes: the sum over processes is then the single-process loss.
    """
    import torch

    cfg, rt = job.cfg, job.rt
    total_weight = torch.tensor([job.examples[i].weight for i in idx], dtype=torch.float32).sum()
    mine = collate([job.examples[i] for i in idx[rt.rank :: rt.world]], job.tok.pad_token_id)
    batch = {k: v.to(rt.device) for k, v in mine.items()}
    keep = target_positions(batch["labels"])  # (K,)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    no_sync = job.model.no_sync() if rt.distributed and not sync else nullcontext()
    with no_sync:
        with autocast(rt.device, job.dtype):
            logits = job.model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
            t_logits = None
            if job.teacher is not None:
                with torch.no_grad():
                    t_logits = job.teacher(**inputs, logits_to_keep=keep).logits
        labels = batch["labels"][:, keep + 1]  # (B, K)
        loss = weighted_loss(logits, labels, batch["weights"], t_logits, cfg, total_weight)
        (loss * rt.world / cfg.grad_accum).backward()
    return loss.item() / cfg.grad_accum


def is_onpolicy_step(step: int, cfg: TrainConfig) -> bool:
    """Whether optimizer step `step` trains on the student's own samples: a pure function of (seed, step)
    drawn with probability --lmbda, so a resumed run mixes exactly as the uninterrupted one."""
    if cfg.lmbda <= 0 or cfg.lmbda >= 1:
        return cfg.lmbda >= 1
    import torch

    g = torch.Generator().manual_seed(cfg.seed * 7919 + step + 1)
    return float(torch.rand(1, generator=g)) < cfg.lmbda


def sample_seed(cfg: TrainConfig, step: int, micro: int, slot: int) -> int:
    """The noise seed of slot `slot` of a global batch: the same whichever process samples it."""
    return ((cfg.seed * 1_000_003 + step) * 10_007 + micro) * 65_537 + slot


def teacher_scores(job: Job, batch: dict[str, Any], keep: Any) -> tuple[Any, Any]:
    """(ids or None, logprobs) of the teacher at the kept positions: (B, K, V) full log-probabilities from a
    transformers teacher (or its top --kd-top-k), (B, K, k) from a scoring teacher."""
    import torch
    from nestling.distill.onpolicy import scores_to_batch

    cfg = job.cfg
    if not hasattr(job.teacher, "score"):
        with torch.no_grad():
            t = job.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
            ).logits
        lp = torch.log_softmax(t.float(), dim=-1)  # (B, K, V)
        if not cfg.kd_top_k:
            return None, lp
        top = lp.topk(min(cfg.kd_top_k, lp.shape[-1]), dim=-1)
        return top.indices, top.values
    k = cfg.kd_top_k or 20
    lengths = batch["attention_mask"].sum(1).tolist()
    seqs = [batch["input_ids"][i, : int(n)].tolist() for i, n in enumerate(lengths)]
    return scores_to_batch(job.teacher.score(seqs, k), keep, k)


def onpolicy_micro_step(job: Job, step: int, micro: int, sync: bool) -> tuple[float, int]:
    """The student samples completions for its share of a batch of prompts, the teacher scores them, and the
    loss is the generalized JSD on the sampled tokens; (this process's part of the loss, global tokens).

    Normalised like micro_step: by the global batch's weights, times the world size for DDP's average.
    """
    import torch
    from nestling.distill.onpolicy import generalized_jsd, sample

    cfg, rt = job.cfg, job.rt
    idx = batch_indices(step, micro, cfg, len(job.prompts))
    total_weight = torch.tensor([job.prompts[i].weight for i in idx], dtype=torch.float32).sum()
    slots = list(range(len(idx)))[rt.rank :: rt.world]
    prompts = [job.prompts[idx[s]] for s in slots]
    with autocast(rt.device, job.dtype):
        completions = sample(
            job.student,
            [p.ids for p in prompts],
            seeds=[sample_seed(cfg, step, micro, s) for s in slots],
            max_new=[min(cfg.max_new_tokens, cfg.max_len - len(p.ids)) for p in prompts],
            temperature=cfg.sample_temperature,
            eos_id=job.tok.eos_token_id,
            pad_id=job.tok.pad_token_id,
        )
    mine = [Example(p.ids + c, len(p.ids), p.weight) for p, c in zip(prompts, completions, strict=True)]
    batch = {k: v.to(rt.device) for k, v in collate(mine, job.tok.pad_token_id).items()}
    keep = target_positions(batch["labels"])  # (K,)
    no_sync = job.model.no_sync() if rt.distributed and not sync else nullcontext()
    with no_sync:
        with autocast(rt.device, job.dtype):
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logits = job.model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
            t_ids, t_lp = teacher_scores(job, batch, keep)
        div = generalized_jsd(logits, t_lp, cfg.beta, cfg.kd_temperature, t_ids)  # (B, K)
        mask = (batch["labels"][:, keep + 1] != -100).float()
        per_example = (div * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        loss = (per_example * batch["weights"]).sum() / total_weight.to(per_example.device).clamp(min=1e-8)
        (loss * rt.world / cfg.grad_accum).backward()
    tokens = all_reduce_sum(float(sum(len(e.ids) for e in mine)), rt)
    return loss.item() / cfg.grad_accum, int(tokens)


def train_step(job: Job, step: int) -> tuple[float, int]:
    """One optimizer step over grad_accum micro-batches; (global loss, global tokens)."""
    import torch

    cfg = job.cfg
    lr = lr_at(step, cfg, planned_steps(job), job.state.get("planned_warmup"), lr_anchor(job))
    for group in job.optimizer.param_groups:
        group["lr"] = lr
    loss, tokens = 0.0, 0
    onpolicy = is_onpolicy_step(step, cfg)
    for micro in range(cfg.grad_accum):
        sync = micro == cfg.grad_accum - 1
        if onpolicy:
            part, n = onpolicy_micro_step(job, step, micro, sync)
            loss, tokens = loss + part, tokens + n
            continue
        idx = batch_indices(step, micro, cfg, len(job.examples))
        loss += micro_step(job, idx, sync=sync)
        tokens += sum(len(job.examples[i].ids) for i in idx)
    if onpolicy:
        job.state["onpolicy_steps"] = job.state.get("onpolicy_steps", 0) + 1
    if cfg.grad_clip > 0:
        # DDP has averaged the gradients: every process clips the same norm and steps to the same weights.
        torch.nn.utils.clip_grad_norm_(job.trainable, cfg.grad_clip)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(loss, job.rt), tokens


def all_reduce_sum(value: float, rt: Runtime) -> float:
    if not rt.distributed:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return float(t.item())


def maybe_checkpoint(job: Job) -> None:
    """Every --checkpoint-every steps (not at the end: the final model supersedes it); rank 0 writes."""
    cfg, step = job.cfg, job.state["step"]
    if not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < planned_steps(job)):
        return
    if job.rt.is_main:
        sidecar = {**job.state, "recipe": cfg.recipe(), "inputs": job.inputs}
        checkpoint.save_checkpoint(
            job.ckpt_root, step, job.student, job.tok, job.optimizer, sidecar, cfg.keep_checkpoints
        )


def fit(job: Job) -> None:
    """The loop: one optimizer step at a time from state["step"] to the planned steps (cfg.steps, or the
    budget's cut of them), checkpointing as it goes."""
    from tqdm.auto import tqdm

    cfg, state = job.cfg, job.state
    bar = tqdm(
        total=planned_steps(job),
        initial=state["step"],
        desc=f"train {job.name}",
        unit="step",
        disable=not (job.rt.is_main and cfg.progress),
        dynamic_ncols=True,
        mininterval=1.0,
    )
    t0, tokens0, seconds0 = time.perf_counter(), state["tokens"], state["seconds"]
    with stop_on_sigterm(job):
        while state["step"] < planned_steps(job):
            step = state["step"]
            try:
                loss, tokens = train_step(job, step)
            except RuntimeError as e:
                if not job.rt.distributed:
                    raise
                raise lost_peer(job, e) from None
            elapsed = time.perf_counter() - t0
            state.update(step=step + 1, tokens=state["tokens"] + tokens, seconds=seconds0 + elapsed)
            state["losses"].append(round(loss, 5))
            if plan_budget(job):
                bar.total = planned_steps(job)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{(state['tokens'] - tokens0) / max(elapsed, 1e-9):,.0f}"
            )
            maybe_checkpoint(job)
    bar.close()


# --max-minutes measures the speed over windows of these steps, the first after step 1 (which pays for
# allocation and warm-up), and plans the steps that fit. Steps differ in cost with their batch's longest row,
# and the speed drifts: the default run's first 4 steps measured 7.3 s/step where its 37 steps then averaged
# 5.9, a recovery's first 8 steps 4.04 s/step where the next 57 took 3.1, and on-policy steps get faster all
# through a run as the student learns to stop (its samples shorten): re-planned only in the first half of the
# plan, three 0.248x on-policy recoveries trained 186-254 s of a 270 s budget. So every window re-plans, to
# the end, from its own speed and the time left, and the cosine goes on from where it was (lr_anchor).
BUDGET_PROBE_STEPS = 8
BUDGET_MIN_STEPS = 20


def planned_steps(job: Job) -> int:
    """cfg.steps, or the budget's cut of them once measured (kept in the checkpoints' sidecar, so a resumed
    run follows the same schedule)."""
    return int(job.state.get("planned_steps") or job.cfg.steps)


def lr_anchor(job: Job) -> tuple[int, float] | None:
    anchor = job.state.get("lr_anchor")
    return (int(anchor[0]), float(anchor[1])) if anchor else None


def plan_budget(job: Job) -> bool:
    """With --max-minutes, at the end of each window of probe steps: plan the steps the budget affords at the
    window's measured speed (the mean over processes, so every rank plans the same). True when it planned."""
    cfg, state = job.cfg, job.state
    step = state["step"]
    if not cfg.max_minutes:
        return False
    if step == 1:
        state["budget_from"] = state["window_from"] = state["seconds"]
        return False
    if (step - 1) % BUDGET_PROBE_STEPS or "window_from" not in state:
        return False
    per_step = (state["seconds"] - state["window_from"]) / BUDGET_PROBE_STEPS
    per_step = all_reduce_sum(per_step, job.rt) / job.rt.world
    state["window_from"] = state["seconds"]
    left = cfg.max_minutes * 60 - (state["seconds"] - state["budget_from"])
    fit_steps = step - 1 + int(max(left, 0.0) / max(per_step, 1e-9))
    first, before = "planned_steps" not in state, planned_steps(job)
    after = max(min(cfg.steps, BUDGET_MIN_STEPS), min(cfg.steps, fit_steps), step)
    if first:  # a cut keeps the warmup's share (cfg.warmup / cfg.steps), never ending before the probe
        share = cfg.warmup * after // cfg.steps
        state["planned_warmup"] = min(cfg.warmup, max(share, min(cfg.warmup, step)))
    # Past warmup (a first plan gets there when cfg.warmup < the probe), pin the progress reached.
    if after != before and step > state["planned_warmup"]:
        warmup = state["planned_warmup"]
        state["lr_anchor"] = [step, cosine_progress(step, before, warmup, lr_anchor(job))]
    state["planned_steps"] = after
    if after != before:
        log.info(
            "%s: %d of %d steps fit --max-minutes %g at %.2f s/step; the schedule ends there",
            job.name, after, cfg.steps, cfg.max_minutes, per_step,
        )  # fmt: skip
    return True


@contextmanager
def stop_on_sigterm(job: Job) -> Iterator[None]:
    """When one process fails, torchrun sends SIGTERM to the others: end with the line lost_peer() writes."""
    if not job.rt.distributed or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise lost_peer(job, "stopped by the launcher")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def lost_peer(job: Job, e: Exception | str) -> NestlingError:
    """A collective failed or the launcher stopped us: another process died. One line, and how to go on."""
    done = checkpoint.newest_checkpoint(job.ckpt_root)
    where = f"from {done.name}" if done else "from the start (no checkpoint yet)"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return NestlingError(
        f"rank {job.rt.rank} of {job.rt.world}: another training process failed during step "
        f"{job.state['step'] + 1} ({first}); re-run the same command to resume {where}"
    )


# ---- save ----------------------------------------------------------------------------------------------


def save(job: Job) -> None:
    """Rank 0: the final student (LoRA merged), its manifest; the checkpoints go."""
    import shutil

    from nestling.distill.students import count_params

    if not job.rt.is_main:
        return
    cfg = job.cfg
    plain = checkpoint.save_model_dir(job.out / "model", job.student, job.tok)
    metrics = train_metrics(job, count_params(plain))
    write_manifest(
        job.out,
        stage="train",
        config=cfg.recipe(),
        inputs=job.inputs,
        files=["model"],
        metrics=metrics,
        student=job.spec.to_dict(),
        name=job.name,
    )
    shutil.rmtree(job.ckpt_root, ignore_errors=True)  # the final model supersedes them
    log.info(
        "saved %s (%.2fM params, %.0f tokens/s)",
        job.out / "model",
        metrics["params"] / 1e6,
        metrics["train_tokens_per_s"],
    )


def train_metrics(job: Job, params: int) -> dict[str, Any]:
    cfg, state, losses = job.cfg, job.state, job.state["losses"]
    head, tail = losses[:5], losses[-20:]
    return {
        "params": params,
        "steps": state["step"],
        "steps_asked": cfg.steps,
        "warmup": state.get("planned_warmup", cfg.warmup),
        "examples": len(job.examples),
        "examples_cut": sum(e.cut > 0 for e in job.examples),
        "examples_dropped": len(objective_pairs(job.rows, cfg.objective, cfg.alpha)) - len(job.examples),
        "rows": len(job.rows),
        "train_tokens": state["tokens"],
        "train_seconds": round(state["seconds"], 2),
        "train_tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "initial_loss": round(sum(head) / max(1, len(head)), 4),
        "final_loss": round(sum(tail) / max(1, len(tail)), 4),
        "device": str(job.rt.device),
        "processes": job.rt.world,
        "precision": "bf16" if job.dtype is not None else "fp32",
        "lora": cfg.lora,
        "onpolicy_steps": state.get("onpolicy_steps", 0),
        "onpolicy_prompts": len(job.prompts),
    }


# ---- the recipe ----------------------------------------------------------------------------------------


def train(cfg: TrainConfig, rows: list[dict] | None = None, out: Path | None = None) -> Path:
    """setup -> fit -> save; returns the student's directory, RUN/students/<name> unless `out` names another.
    Resumable; N processes under torchrun.

    `rows` replaces the run's kept traces (a compress stage's recovery set, a round's relabelled union), so no
    stage writes a traces directory only to be read back; their content keys freshness and resume as the
    traces files do. The run's held-out questions are still never trained on."""
    run = Path(cfg.run)
    out = Path(out) if out is not None else RunDir(run).student(cfg.name or cfg.spec.name)
    if rows is None:
        rows, inputs = training_rows(run), fingerprint_inputs(run)
    else:
        rows = training_rows(run, rows)
        inputs = {"rows": fingerprint_rows(rows)}
    if is_fresh(out, "train", cfg.recipe(), inputs):
        log.info("%s is up to date (same recipe and traces); skipping", out)
        return out
    rt = setup_runtime(cfg.threads)
    job = setup(cfg, rt, rows, inputs, out)
    fit(job)
    save(job)
    barrier()  # the other ranks return once the student is on disk
    return out
