"""`nestling distill`: traces -> train (each student) -> eval, resumable, ending with a side-by-side table.

    nestling distill --out runs/x
    nestling distill --out runs/x --students tiny,pruned=gguf:smollm2?keep_layers=8 --objective cot
    nestling distill --out runs/x --students tiny --rounds 3      # + student rounds (distill.rounds)

Each stage is skipped when its manifest records the same config and inputs (core.manifest.is_fresh), so
re-running the command after an interruption continues where it stopped; training itself resumes from its
newest checkpoint. Torch is imported by the stages, never by this module.

Under a launcher (``torchrun --nproc_per_node N -m nestling -- distill ...``) every process trains; the
traces and the evaluation run on rank 0 while the others wait at a barrier.

Student recipes: from-scratch presets and pretrained (``hf:``) students need different learning rates and
step counts; ``distill.train`` holds the measured defaults, and ``--steps`` / ``--lr`` override them all.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestling.distill.accel import PRECISIONS
from nestling.distill.train import OBJECTIVES, TrainConfig

from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.rundir import RunDir

if TYPE_CHECKING:
    from nestling.distill.students import StudentShape
    from nestling.distill.traces import TracesConfig

log = logging.getLogger(__name__)

# The embedded default: a fast from-scratch student (<= 1/20 of the teacher's parameters) and SmolLM2
# self-distilled on its own verified rationales, which keeps the arithmetic facts the tiny one cannot learn;
# `nestling run` then cuts a compact student from the latter (nestling.run.DEFAULT_COMPRESS). Depth pruning
# at train time (gguf:smollm2?keep_layers=N) lost too much: 12 of 30 layers 6%, 24 of 30 31% held-out, against
# 77% unpruned (benchmarks/results/students_exp.json).
DEFAULT_STUDENTS = ["tiny", "gguf:smollm2"]


@dataclass
class DistillConfig:
    """`nestling distill`: traces -> train each student -> eval on the held-out split."""

    out: str = field(default="runs/default", metadata={"help": "run directory (re-run to resume)"})
    task: str | None = field(default=None, metadata={"help": "task spec (default: the traces stage's mix)"})
    teacher: str | None = field(default=None, metadata={"help": "teacher spec (default: gguf:smollm2)"})
    students: list[str] = field(
        default_factory=lambda: list(DEFAULT_STUDENTS),
        metadata={"help": "student specs, comma- or space-separated (see distill.students)"},
    )
    objective: str = field(
        default="multitask", metadata={"help": "cot | multitask | answer-only", "choices": OBJECTIVES}
    )
    alpha: float = field(default=0.5, metadata={"help": "multitask weight of the answer loss"})
    samples: int | None = field(default=None, metadata={"help": "teacher samples per question (k)"})
    adaptive: bool = field(
        default=False,
        metadata={"help": "adaptive teacher sampling: more samples for unsolved questions (see traces)"},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "adaptive: most samples per question (traces' 2 x samples)"}
    )
    stop_after: int | None = field(
        default=None, metadata={"help": "adaptive: verified rationales after which a question stops (1)"}
    )
    budget_tokens: int | None = field(default=None, metadata={"help": "adaptive: teacher tokens in all"})
    budget_seconds: float | None = field(default=None, metadata={"help": "adaptive: teacher seconds in all"})
    teacher_calculator: bool | None = field(
        default=None,
        metadata={
            "help": "gguf teachers write with the calculator in the loop (traces --calculator); default off"
        },
    )
    min_coverage: float = field(
        default=0.03,
        metadata={
            "help": "stop after traces when fewer training questions than this share have a verified "
            "rationale: the teacher cannot do the task, and a student would learn from almost nothing "
            "(0 = never stop)"
        },
    )
    n: int | None = field(default=None, metadata={"help": "questions to draw (train + held-out)"})
    heldout: float | None = field(
        default=None,
        metadata={
            "help": "held-out questions: a fraction < 1 or a count (traces' default: half of n, at most 200)"
        },
    )
    concurrency: int | None = field(default=None, metadata={"help": "openai teachers: requests in flight"})
    request_extra: str | None = field(
        default=None, metadata={"help": "openai teachers: JSON object merged into every request body"}
    )
    rationale_style: str | None = field(
        default=None,
        metadata={"help": "full | short: what rows train on when the teacher writes a chain (traces' full)"},
    )
    seed: int = field(default=0, metadata={"help": "seed for traces, splits and training"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps for every student"})
    train_minutes: float = field(
        default=0.0,
        metadata={
            "help": "wall-clock budget of each student's training: its steps cut to what fits at the "
            "measured speed (train's --max-minutes; 0 = no budget)"
        },
    )
    lr: float | None = field(default=None, metadata={"help": "peak learning rate for every student"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate at most this many questions"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads per process"})
    lora: bool = field(
        default=False,
        metadata={
            "help": "LoRA adapters for the pretrained (hf:) students, merged on save; presets train fully"
        },
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto | fp32 | bf16 autocast (see nestling train)", "choices": PRECISIONS},
    )
    # On-policy distillation and logit KD (GKD, see distill.onpolicy), passed to every student's training;
    # unset: nestling train's defaults. Every student must then share the KD teacher's tokenizer.
    lmbda: float | None = field(
        default=None,
        metadata={
            "help": "share of steps trained on-policy: each student samples, --kd-teacher scores every token "
            "(0 = off-policy only, train's default; 1 = on-policy only)"
        },
    )
    beta: float | None = field(
        default=None, metadata={"help": "on-policy generalized JSD: 0 forward KL, 1 reverse KL (train's 0.5)"}
    )
    kd_alpha: float | None = field(
        default=None, metadata={"help": "off-policy steps: weight of KL to the teacher's logits (train's 0)"}
    )
    kd_teacher: str | None = field(
        default=None,
        metadata={
            "help": "teacher that scores: gguf:|hf: (transformers, full logits), llamacpp:PATH or "
            "openai:MODEL@URL (top-k; the server must return prompt_logprobs) (default: --teacher when "
            "set, else gguf:smollm2)"
        },
    )
    kd_temperature: float | None = field(
        default=None, metadata={"help": "softmax temperature of KD and the JSD (train's 1.0)"}
    )
    kd_top_k: int | None = field(
        default=None, metadata={"help": "on-policy: the teacher's top-k tokens only (train's 0: all)"}
    )
    sample_temperature: float | None = field(
        default=None, metadata={"help": "temperature of the students' on-policy samples (train's 1.0)"}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "longest on-policy sample in tokens (train's 96)"}
    )
    onpolicy_fresh: int | None = field(
        default=None,
        metadata={"help": "fresh task questions (never held-out) added to the on-policy prompts"},
    )
    # Rounds (expert iteration, distill.rounds): each trained student samples, its verified rationales join
    # the training set and the next round retrains from the base model; the best round on dev is kept.
    rounds: int = field(
        default=1,
        metadata={
            "help": "training rounds: 1 = the teacher's rows only; N > 1 adds up to N - 1 student rounds"
        },
    )
    round_samples: int = field(
        default=4, metadata={"help": "rounds: rationales each student samples per question"}
    )
    round_fresh: int = field(
        default=100,
        metadata={"help": "rounds: fresh generator questions (never held-out) each round also samples on"},
    )
    round_dev: int = field(
        default=50,
        metadata={
            "help": "rounds: fresh dev questions scored after each round; stop when the dev accuracy does "
            "not improve, keep the best round (0 = run every round, keep the last)"
        },
    )
    round_temperature: float = field(
        default=0.7, metadata={"help": "rounds: the students' sampling temperature"}
    )
    round_rationalize: bool = field(
        default=False,
        metadata={
            "help": "rounds: STaR rationalization, questions a round leaves unsolved are sampled again with "
            "the gold answer as a hint in the prompt; kept rows (same filters, the question without the "
            "hint) are tagged :rationalized"
        },
    )
    round_calculator: bool | None = field(
        default=None,
        metadata={
            "help": "rounds: students sample with the calculator in the loop (a line's false result is "
            "replaced by the true value before the student goes on), so kept rows carry the student's "
            "procedure with true arithmetic; tagged :calculator (default: as the teacher wrote, "
            "--teacher-calculator)"
        },
    )

    def student_names(self) -> list[str]:
        from nestling.distill.students import parse_student_spec

        return [parse_student_spec(s).name for s in self.students]

    def __post_init__(self) -> None:
        if isinstance(self.students, str):
            self.students = [self.students]
        self.students = [s.strip() for item in self.students for s in _split_specs(item) if s.strip()]
        check(bool(self.students), "--students: name at least one student, e.g. tiny")
        names = self.student_names()
        check(len(set(names)) == len(names), f"--students: duplicate student names {names}; use NAME=SPEC")
        check(
            self.objective in OBJECTIVES,
            f"--objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}",
        )
        check(self.steps is None or self.steps > 0, f"--steps {self.steps}: must be > 0")
        check(self.train_minutes >= 0, f"--train-minutes {self.train_minutes}: must be >= 0 (0 = no budget)")
        check(self.lr is None or self.lr > 0, f"--lr {self.lr}: must be > 0")
        check(0 <= self.min_coverage < 1, f"--min-coverage {self.min_coverage}: must be in [0, 1), e.g. 0.03")
        from nestling.distill.accel import launched_world
        from nestling.distill.rounds import rounds_config

        rounds_config(self)  # range checks
        check(
            self.rounds == 1 or launched_world() == 1,
            f"--rounds {self.rounds}: rounds run in one process; start it without torchrun/accelerate",
        )
        for spec in self.students:  # the training options' own range checks, now rather than after traces
            train_config(self, spec)
        check_kd_students(self)


# DistillConfig fields passed to each student's TrainConfig under the same name when set.
TRAIN_FIELDS = (
    "lmbda", "beta", "kd_alpha", "kd_temperature", "kd_top_k", "sample_temperature", "max_new_tokens",
    "onpolicy_fresh",
)  # fmt: skip


def uses_kd(cfg: DistillConfig) -> bool:
    return bool(cfg.lmbda) or bool(cfg.kd_alpha)


def kd_teacher_spec(cfg: DistillConfig) -> str | None:
    """The teacher that scores: --kd-teacher, else --teacher (the one that wrote the traces), else train's
    default (None)."""
    return cfg.kd_teacher or cfg.teacher


def train_config(cfg: DistillConfig, spec: str) -> TrainConfig:
    """One student's TrainConfig; unset steps/lr (and batch, warmup, ...) come from its kind's recipe."""
    from nestling.distill.students import parse_student_spec

    extra = {k: getattr(cfg, k) for k in TRAIN_FIELDS if getattr(cfg, k) is not None}
    if uses_kd(cfg) and kd_teacher_spec(cfg):
        extra["kd_teacher"] = kd_teacher_spec(cfg)
    return TrainConfig(
        run=str(cfg.out),
        student=spec,
        objective=cfg.objective,
        alpha=cfg.alpha,
        seed=cfg.seed,
        threads=cfg.threads,
        steps=cfg.steps,
        max_minutes=cfg.train_minutes,
        lr=cfg.lr,
        lora=cfg.lora and parse_student_spec(spec).pretrained,
        precision=cfg.precision,
        **extra,
    )


def check_kd_students(cfg: DistillConfig) -> None:
    """KD and on-policy steps compare the student's and the teacher's distributions token by token: a
    from-scratch preset has its own tokenizer, so it cannot take them (train refuses it too, but only after
    the traces)."""
    if not uses_kd(cfg):
        return
    from nestling.distill.students import parse_student_spec

    flag = f"--lmbda {cfg.lmbda}" if cfg.lmbda else f"--kd-alpha {cfg.kd_alpha}"
    for text in cfg.students:
        spec = parse_student_spec(text)
        check(
            spec.pretrained,
            f"{flag}: student {spec.name!r} is a from-scratch preset with its own tokenizer; KD needs "
            "students sharing the teacher's tokenizer (gguf:smollm2, hf:DIR), e.g. --students gguf:smollm2",
        )


def check_kd_teacher(cfg: DistillConfig) -> None:
    """With --lmbda/--kd-alpha: the scoring teacher can score (a GGUF that exists, a server that returns
    prompt_logprobs) and each student's vocabulary fits it (the same one for a transformers teacher, a
    subset for a top-k one), read from the files without loading weights."""
    if not uses_kd(cfg):
        return
    from nestling.distill.onpolicy import check_scorer_spec, is_scorer_spec, spec_vocab
    from nestling.distill.students import parse_student_spec
    from nestling.distill.teachers import check_teacher_spec

    teacher = kd_teacher_spec(cfg) or TrainConfig.kd_teacher
    scorer = is_scorer_spec(teacher)
    if scorer:
        check(
            not cfg.kd_alpha,
            f"--kd-teacher {teacher}: it scores on-policy samples only (--lmbda); --kd-alpha needs a "
            "transformers teacher (hf:DIR or gguf:smollm2)",
        )
        check_scorer_spec(teacher)
    else:
        check_teacher_spec(teacher)
    if teacher.startswith("openai:"):
        return  # the served tokenizer is unknown offline; the scorer sends the student's ids as they are
    sources = {parse_student_spec(s).source for s in cfg.students} - {teacher.replace("llamacpp:", "gguf:")}
    if not sources:
        return
    want = spec_vocab(teacher)
    for source in sorted(sources):
        have = spec_vocab(source)
        if want is None or have is None:
            continue
        if scorer:
            missing = [t for t in have if t not in want]
            check(
                not missing,
                f"--kd-teacher {teacher}: {len(missing)} of the {len(have)} tokens of student {source!r} are "
                f"not in its vocabulary (e.g. {missing[:1]}); KD needs the teacher's tokenizer or a trim",
            )
        else:
            check(
                have == want,
                f"--kd-teacher {teacher}: its tokenizer differs from the one of student {source!r} "
                f"({len(want)} vs {len(have)} tokens); full-logit KD needs a shared tokenizer",
            )


def _split_specs(text: str) -> list[str]:
    """Commas separate students; a spec's own options are joined by '&', so they never hold one."""
    return text.split(",")


def traces_config(cfg: DistillConfig) -> TracesConfig:
    """The traces stage's config for this run (its defaults where cfg leaves a field unset)."""
    from nestling.distill.traces import TracesConfig

    names = {f.name for f in dataclasses.fields(TracesConfig) if f.init}
    wanted = {
        "out": cfg.out,
        "task": cfg.task,
        "teacher": cfg.teacher,
        "samples": cfg.samples,
        "adaptive": cfg.adaptive or None,
        "max_samples": cfg.max_samples,
        "stop_after": cfg.stop_after,
        "budget_tokens": cfg.budget_tokens,
        "budget_seconds": cfg.budget_seconds,
        "n": cfg.n,
        "heldout": cfg.heldout,
        "concurrency": cfg.concurrency,
        "request_extra": cfg.request_extra,
        "rationale_style": cfg.rationale_style,
        "calculator": cfg.teacher_calculator,
        "seed": cfg.seed,
        "threads": cfg.threads,
    }
    return TracesConfig(**{k: v for k, v in wanted.items() if v is not None and k in names})


def check_coverage(traces_dir: Path, min_coverage: float) -> None:
    """Refuse to train on a task the teacher cannot do: a student of a handful of rationales loses to the
    trivial baseline, and the run would still recommend it."""
    from nestling.core.manifest import read_json

    card = read_json(traces_dir / "datacard.json", default=None) or {}
    coverage = card.get("coverage")
    if coverage is None or coverage >= min_coverage:
        return
    teacher, train = (card.get("teacher") or {}).get("spec"), (card.get("questions") or {}).get("train")
    raise NestlingError(
        f"traces: the teacher {teacher} has a verified rationale for {card.get('questions_covered', 0)} of "
        f"{train} training questions ({100 * coverage:.1f}%, under --min-coverage {100 * min_coverage:g}%): "
        f"it cannot do task {card.get('task')}; use an easier task or a stronger teacher, sample more "
        "(--adaptive --max-samples 16), or pass --min-coverage 0"
    )


def _traces(cfg: DistillConfig) -> Path:
    from nestling.distill.traces import run_traces

    return run_traces(traces_config(cfg))


def check_specs(cfg: DistillConfig) -> dict[str, StudentShape]:
    """Every spec resolved and checked before the teacher is asked anything: students, then task and
    teacher. Returns the students' shapes by name."""
    shapes = check_students(cfg)
    check_sources(cfg)
    return shapes


def check_students(cfg: DistillConfig) -> dict[str, StudentShape]:
    """Each student resolved without loading weights (see check_student_spec); their shapes by name, for
    checks that depend on them (nestling run's compress shapes)."""
    from nestling.distill.students import check_student_spec, parse_student_spec

    specs = [parse_student_spec(text) for text in cfg.students]
    return {spec.name: check_student_spec(spec, lora=cfg.lora) for spec in specs}


def check_sources(cfg: DistillConfig) -> None:
    """The task (loaded as the traces stage loads it), the teacher (its file, or its endpoint answering)
    and, with --lmbda/--kd-alpha, the teacher that scores (check_kd_teacher)."""
    from nestling.distill.tasks import load_task
    from nestling.distill.teachers import check_teacher_spec

    tcfg = traces_config(cfg)
    load_task(tcfg.task)
    check_teacher_spec(tcfg.teacher)
    check_kd_teacher(cfg)


def run_distill(cfg: DistillConfig, checked: bool = False) -> dict[str, Any]:
    """Traces, then each student, then eval. Returns {run, students: {name: model_dir}, eval, table}.
    checked: the caller has run check_specs(cfg) already."""
    from nestling.distill.accel import barrier, init_process_group, is_main_process
    from nestling.distill.evaluate import EvalConfig, evaluate
    from nestling.distill.rounds import run_rounds
    from nestling.distill.students import parse_student_spec
    from nestling.distill.train import train

    run = Path(cfg.out)
    init_process_group()
    if is_main_process():
        if not checked:
            check_specs(cfg)
        _traces(cfg)
    barrier()
    check_coverage(RunDir(run).traces, cfg.min_coverage)
    models: dict[str, Path] = {}
    for spec, parsed in zip(cfg.students, map(parse_student_spec, cfg.students), strict=True):
        tcfg = train_config(cfg, spec)
        out = train(tcfg) if cfg.rounds == 1 else run_rounds(cfg, tcfg)
        models[parsed.name] = out / "model"
    if not models:
        raise NestlingError("no student trained")
    if not is_main_process():
        return {"run": run, "students": models, "eval": None, "table": ""}
    result = evaluate(
        EvalConfig(
            run=str(run),
            students=list(models),
            teacher=cfg.teacher,
            limit=cfg.eval_limit,
            threads=cfg.threads,
        )
    )
    return {"run": run, "students": models, "eval": result, "table": result["table"]}
