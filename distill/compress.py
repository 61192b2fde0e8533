"""Compress a trained student: trim its vocabulary to the task, prune width and/or depth, recover with KD.

    nestling compress --run runs/x --source smollm2 --intermediate-size 768     # half of every MLP
    nestling compress --run runs/x --source smollm2 --keep-layers 9 --objective mix --beta 1   # + on-policy

Reads RUN/students/<source>/model (a save_pretrained llama, usually the self-distilled student) and writes
  RUN/students/<source>-trim/   the source with its vocabulary trimmed: lossless on task text, and the KD
                                teacher of the compact student (both share one tokenizer, as KD needs);
                                fresh/<key>.json: its answers to a set of fresh questions, which every
                                compact student cut with the same seed (other shapes, other objectives)
                                reuses instead of generating again
  RUN/students/<name>/          the compact student: trimmed, depth/width pruned by measured importance,
                                then trained by ``distill.train`` with logit KD from the trimmed source plus
                                cross-entropy on the verified rationales and on fresh verified ones
                                (--objective off-policy, the default); on-policy: every step the student
                                samples on training and fresh questions and the trimmed source scores
                                each sampled token (GKD; distill.onpolicy); mix: --lmbda of the steps so.
                                fresh.jsonl: the rows the source wrote (greedy, verified) for freshly drawn
                                training questions, handed to train beside the run's verified rows
Every directory is in save_pretrained form with a manifest, so ``nestling eval`` and ``nestling export``
take them as they are; each model is written once (the pruned one to <name>/init-*, which recovery trains
from and removes).

The pieces live apart: distill.vocab (trim_vocab), distill.prune (layer_importance, select_layers,
keep_layers, prune_mlp), distill.fresh (draw_fresh, fresh_rows).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestling.distill.accel import PRECISIONS
from nestling.distill.fresh import MAX_NEW_TOKENS, draw_fresh, fresh_rows
from nestling.distill.prune import keep_layers, layer_importance, prune_mlp, select_layers
from nestling.distill.vocab import trim_vocab

from nestling.core.config import check
from nestling.core.manifest import (
    atomic_write_json,
    fingerprint,
    is_fresh,
    read_json,
    read_manifest,
    write_jsonl,
    write_manifest,
)
from nestling.core.prompting import answer_target, explain_target, student_prompt
from nestling.core.rundir import RunDir

log = logging.getLogger(__name__)


RECOVERY_OBJECTIVES = ("off-policy", "on-policy", "mix")


@dataclass
class CompressConfig:
    """`nestling compress`: a compact student from a trained one."""

    run: str = field(default="runs/default", metadata={"help": "run directory holding traces/ and students/"})
    source: str = field(
        default="smollm2", metadata={"help": "student under RUN/students to compress (its KD teacher too)"}
    )
    name: str | None = field(
        default=None,
        metadata={"help": "compact student's name (default: SOURCE[-cK][-wN], SOURCE-compact if neither)"},
    )
    keep_layers: int | None = field(
        default=None,
        metadata={"help": "decoder layers kept, by angular distance (first and last always; default: all)"},
    )
    intermediate_size: int | None = field(
        default=None,
        metadata={"help": "MLP channels kept per layer, by activation x down-projection norm (default: all)"},
    )
    calib: int = field(default=64, metadata={"help": "training texts used to measure importance"})
    fresh: int = field(
        default=400,
        metadata={"help": "fresh training questions the source answers (verified) for KD; never held-out"},
    )
    vocab_questions: int = field(
        default=2000, metadata={"help": "task questions drawn to cover the task's vocabulary"}
    )
    # Chosen by a one-off sweep (200 held-out questions, SmolLM2 cut to 768 MLP channels; its results are
    # not in benchmarks/results): 300 steps at 1e-4 with KD weight 0.9 beat 600 steps, lr 3e-4 and KD weight
    # 0.5 in both modes. The recovery set is a few hundred rows: a gentle, short schedule that leans on the
    # source's soft targets forgets least. What the defaults give now: benchmarks/results/default_run/.
    # A deeper cut needs more: at 0.248x (25 layers, 256 channels) 600 steps scored 64.0% +- 2.6 over 3 seeds
    # where 300 scored 46.5% (one seed; benchmarks/results/compress_c25_w256*.json).
    recover_steps: int = field(default=300, metadata={"help": "recovery optimizer steps (0 = none)"})
    recover_minutes: float = field(
        default=0.0,
        metadata={
            "help": "wall-clock budget of the recovery: its steps cut to what fits (train's --max-minutes)"
        },
    )
    lr: float = field(default=1e-4, metadata={"help": "recovery peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "recovery examples per step"})
    kd_alpha: float = field(
        default=0.9, metadata={"help": "weight of the KL to the trimmed source's logits (rest: CE)"}
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature for KD"})
    # Off-policy by default: at equal wall-clock on a 2-core CPU it won at every size measured (4.5 minutes,
    # one seed: 70.0 / 62.0 / 35.5% at 0.495x / 0.347x / 0.248x against the mix's 61.0 / 40.0 / 27.0% and
    # on-policy JSD's 47.0 / 31.5 / 7.5%): an on-policy step costs 2-4x an off-policy one there, and a freshly
    # pruned student samples poorly.
    objective: str = field(
        default="off-policy",
        metadata={
            "help": "recovery: off-policy (KD/CE on fixed rationales) | on-policy (the student samples, the "
            "trimmed source scores every token: GKD) | mix (--lmbda of the steps on-policy)",
            "choices": RECOVERY_OBJECTIVES,
        },
    )
    lmbda: float = field(default=0.5, metadata={"help": "--objective mix: share of on-policy steps"})
    beta: float = field(
        default=0.5, metadata={"help": "on-policy generalized JSD: 0 = forward KL, 1 = reverse KL"}
    )
    temperature: float = field(default=1.0, metadata={"help": "temperature of the student's samples"})
    kd_top_k: int = field(
        default=0, metadata={"help": "on-policy: the source's top-k tokens only (0 = full distribution)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for fresh questions and recovery"})
    precision: str = field(
        default="auto",
        metadata={"help": "recovery: auto | fp32 | bf16 autocast (nestling train)", "choices": PRECISIONS},
    )
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default min(2, cores))"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check(
            self.precision in PRECISIONS,
            f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}",
        )
        check(
            self.keep_layers is None or self.keep_layers >= 2,
            f"--keep-layers {self.keep_layers}: must be >= 2",
        )
        check(
            self.intermediate_size is None or self.intermediate_size > 0,
            f"--intermediate-size {self.intermediate_size}: must be > 0",
        )
        check(self.calib > 0, f"--calib {self.calib}: must be > 0")
        check(self.fresh >= 0, f"--fresh {self.fresh}: must be >= 0")
        check(self.vocab_questions >= 0, f"--vocab-questions {self.vocab_questions}: must be >= 0")
        check(self.recover_steps >= 0, f"--recover-steps {self.recover_steps}: must be >= 0")
        check(self.recover_minutes >= 0, f"--recover-minutes {self.recover_minutes}: must be >= 0")
        check(self.lr > 0, f"--lr {self.lr}: must be > 0")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(0.0 <= self.kd_alpha <= 1.0, f"--kd-alpha {self.kd_alpha}: must be in [0, 1]")
        check(
            self.objective in RECOVERY_OBJECTIVES,
            f"--objective {self.objective!r}: use one of {', '.join(RECOVERY_OBJECTIVES)}",
        )
        check(0.0 < self.lmbda < 1.0, f"--lmbda {self.lmbda}: must be in (0, 1); see --objective")
        check(0.0 <= self.beta <= 1.0, f"--beta {self.beta}: must be in [0, 1]")
        check(self.temperature > 0, f"--temperature {self.temperature}: must be > 0")
        check(self.kd_top_k >= 0, f"--kd-top-k {self.kd_top_k}: must be >= 0")
        if self.name is None:
            width = f"-w{self.intermediate_size}" if self.intermediate_size else ""
            depth = f"-c{self.keep_layers}" if self.keep_layers else ""
            self.name = f"{self.source}{depth}{width}" if depth or width else f"{self.source}-compact"

    def recipe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("run", "threads", "progress")}

    def onpolicy_share(self) -> float:
        """GKD's lambda for the recovery run: 0, 1 or --lmbda."""
        return {"off-policy": 0.0, "on-policy": 1.0}.get(self.objective, self.lmbda)


def task_texts(rows: list[dict], questions: list[Any]) -> list[str]:
    """What the student reads and writes on this task: both prompt modes and targets of every verified
    row, and both prompts (+ gold answer) of `questions`."""
    texts = []
    for r in rows:
        texts.append(student_prompt(r["question"]) + explain_target(list(r["steps"]), str(r["answer"])))
        texts.append(student_prompt(r["question"], explain=False) + answer_target(str(r["answer"])))
    for ex in questions:
        texts.append(student_prompt(ex.question))
        texts.append(student_prompt(ex.question, explain=False) + answer_target(str(ex.gold or "")))
    return texts


def calibration_texts(rows: list[dict], n: int) -> list[str]:
    """n task texts spread evenly over the verified rows (both modes), what importance is measured on."""
    return task_texts(rows, [])[:: max(1, 2 * len(rows) // n)][:n]


def _source_inputs(run: RunDir, source: str) -> dict[str, Any]:
    from nestling.distill.train import fingerprint_inputs

    from nestling.core.manifest import try_read_manifest

    m = try_read_manifest(run.student(source)) or {}
    return {"source": m.get("files", {}), "traces": fingerprint_inputs(run.root)}


def trim_name(source: str) -> str:
    """The name a source's lossless trim is published under (the compact student's KD teacher)."""
    return f"{source}-trim"


def compress(cfg: CompressConfig) -> Path:
    """trim -> prune -> recover; returns RUN/students/<name>. Re-running with the same inputs skips."""
    from nestling.distill.accel import set_threads
    from nestling.distill.checkpoint import save_model_dir
    from nestling.distill.students import count_params, load_student

    run = RunDir(cfg.run)
    out = run.student(str(cfg.name))
    inputs = _source_inputs(run, cfg.source)
    if is_fresh(out, "compress", cfg.recipe(), inputs):
        log.info("%s is up to date; skipping", out)
        return out
    set_threads(cfg.threads)
    model, tok = load_student(run.student(cfg.source) / "model")
    teacher_params = count_params(model)
    data = _Data.load(run, cfg)
    model, tok, trim_dir, kept = _trim(model, tok, run, cfg, data, inputs)
    fresh, stats = _fresh_answers(
        model, tok, trim_dir.parent, data.drawn[: cfg.fresh], kept, inputs, cfg.progress
    )
    model, layers, scores = _prune(model, tok, cfg, data.rows)
    params = count_params(model)
    log.info("compact %s: layers %s, %.2fM parameters (%.2fx)", cfg.name, layers, params / 1e6,
             params / teacher_params)  # fmt: skip
    recovery: dict[str, Any] = {}
    if cfg.recover_steps:
        recovery = _recover(model, tok, out, trim_dir, cfg, data.rows + fresh)
    else:
        save_model_dir(out / "model", model, tok)
    write_jsonl(out / "fresh.jsonl", fresh)
    metrics = {
        "params": params,
        "teacher_params": teacher_params,
        "param_ratio": round(params / teacher_params, 4),
        "vocab": len(kept),
        "layers_kept": layers,
        "layer_importance": [round(s, 5) for s in scores],
        "fresh_questions": len(data.drawn[: cfg.fresh]),
        "fresh_rows": len(fresh),
        "fresh_filters": stats.get("filters"),
        "train_rows": len(data.rows),
        "recovery": recovery,
    }
    files = ["model", "fresh.jsonl"]
    write_manifest(out, stage="compress", config=cfg.recipe(), inputs=inputs, files=files, metrics=metrics)
    return out


@dataclass
class _Data:
    """What the stages read from the run: questions, verified rows, the task, and fresh questions."""

    questions: list[dict]
    rows: list[dict]
    task: str
    drawn: list[Any]
    train_qs: list[Any]

    @classmethod
    def load(cls, run: RunDir, cfg: CompressConfig) -> _Data:
        from nestling.distill.evaluate import traces_config
        from nestling.distill.tasks import Example
        from nestling.distill.train import training_rows

        train, held = run.splits(gold_only=False)
        task = str(traces_config(run.root).get("task") or (train + held)[0]["task"])
        return cls(
            questions=train + held,
            rows=training_rows(run.root),
            task=task,
            drawn=draw_fresh(task, train + held, cfg.fresh + cfg.vocab_questions, cfg.seed),
            train_qs=[Example.from_row(r) for r in train],
        )


def _trim(
    model: Any, tok: Any, run: RunDir, cfg: CompressConfig, data: _Data, inputs: dict[str, Any]
) -> tuple[Any, Any, Path, list[int]]:
    """Lossless on task text, so the trimmed source is the compact student's KD teacher; published once,
    under RUN/students/<source>-trim, where recovery reads it."""
    from nestling.distill.checkpoint import save_model_dir
    from nestling.distill.students import count_params

    model, tok, kept = trim_vocab(model, tok, task_texts(data.rows, data.train_qs + data.drawn))
    trim_dir = run.student(trim_name(cfg.source))
    save_model_dir(trim_dir / "model", model, tok)
    write_manifest(
        trim_dir,
        stage="compress",
        config={"source": cfg.source, "vocab_questions": cfg.vocab_questions},
        inputs=inputs,
        files=["model"],
        metrics={"params": count_params(model), "vocab": len(kept)},
    )
    return model, tok, trim_dir / "model", kept


def _fresh_answers(
    model: Any,
    tok: Any,
    trim_dir: Path,
    drawn: list[Any],
    kept: list[int],
    inputs: dict[str, Any],
    progress: bool,
) -> tuple[list[dict], dict[str, Any]]:
    """The trimmed source's verified answers to `drawn`, cached under trim_dir/fresh: 400 of them took 1.2-2
    minutes on 2 cores, beside a 4.5-minute recovery, and every student cut from one source with one seed
    asks the same questions. The key holds what the greedy answers depend on: the source's inputs,
    the trimmed vocabulary, the questions and the answer length."""
    questions = [ex.question for ex in drawn]
    key = fingerprint({"inputs": inputs, "vocab": kept, "questions": questions, "max_new": MAX_NEW_TOKENS})
    path = trim_dir / "fresh" / f"{key[:16]}.json"
    cached = read_json(path, default=None)
    if cached is not None:
        log.info("fresh answers: %d rows cached in %s", len(cached["rows"]), path)
        return cached["rows"], cached["stats"]
    rows, stats = fresh_rows(model, tok, drawn, progress)
    atomic_write_json(path, {"questions": len(questions), "rows": rows, "stats": stats})
    return rows, stats


def _prune(model: Any, tok: Any, cfg: CompressConfig, rows: list[dict]) -> tuple[Any, list[int], list[float]]:
    """Depth (and optionally width) by measured importance; in place."""
    calib = calibration_texts(rows, cfg.calib)
    layers, scores = list(range(model.config.num_hidden_layers)), []
    if cfg.keep_layers is not None:  # a calibration pass only where depth is cut
        scores = layer_importance(model, tok, calib)
        layers = select_layers(scores, cfg.keep_layers)
        model = keep_layers(model, layers)
    if cfg.intermediate_size:
        model = prune_mlp(model, tok, calib, cfg.intermediate_size)
    return model, layers, scores


def _recover(
    model: Any, tok: Any, out: Path, trim_dir: Path, cfg: CompressConfig, rows: list[dict]
) -> dict[str, Any]:
    """Logit KD from the trimmed source plus CE on `rows` and/or on-policy GKD steps (the student samples on
    training and fresh questions, the trimmed source scores), through distill.train, which writes the
    recovered student to out/model. Returns train's metrics.

    train loads its student from a directory: the pruned model goes to out/init-<recipe hash> (a changed
    recipe is a new path, so train never resumes onto another pruning) and goes once training is done."""
    from nestling.distill.students import save_student
    from nestling.distill.train import TrainConfig, train

    init = out / f"init-{fingerprint(cfg.recipe())[:12]}"
    shutil.rmtree(init, ignore_errors=True)
    save_student(model, tok, init)
    tcfg = TrainConfig(
        run=cfg.run,
        student=f"{cfg.name}=hf:{init.resolve()}",
        steps=cfg.recover_steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        warmup=min(30, cfg.recover_steps // 10),
        max_minutes=cfg.recover_minutes,
        kd_alpha=cfg.kd_alpha,
        kd_teacher=f"hf:{trim_dir.resolve()}",
        kd_temperature=cfg.kd_temperature,
        lmbda=cfg.onpolicy_share(),
        beta=cfg.beta,
        sample_temperature=cfg.temperature,
        kd_top_k=cfg.kd_top_k,
        onpolicy_fresh=cfg.fresh if cfg.objective != "off-policy" else 0,
        seed=cfg.seed,
        precision=cfg.precision,
        threads=cfg.threads,
        progress=cfg.progress,
    )
    train(tcfg, rows=rows, out=out)
    shutil.rmtree(init, ignore_errors=True)
    return read_manifest(out, "train").get("metrics", {})
