"""`nestling run`: the one command, traces -> train -> eval -> export -> report, every field defaulted.

nestling run --out runs/default
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from nestling.distill.pipeline import DistillConfig
from nestling.distill.teachers import DEFAULT_TEACHER

from nestling.core.config import check
from nestling.core.rundir import RunDir
from nestling.latency import measure_calculator, measure_export
from nestling.report import collect_report, write_report

if TYPE_CHECKING:
    from nestling.distill.students import StudentShape

log = logging.getLogger(__name__)


# How --budget-minutes is spent. Three stages scale with how long one lets them run, and each gets a share:
# the teacher's adaptive sampling (extra samples for unsolved questions stop when it is spent), the students'
# training and each compact student's recovery (steps cut to what fits at the speed measured on their first
# steps, distill.train's --max-minutes). The rest is work that follows the held-out split: evaluation (~6 min
# on 2 cores with AVX512-BF16, the teacher's greedy pass half of it), exports and their parity checks (~3.5
# min), timing (--latency-questions) and the calculator pass. With shares of 0.25/0.2/0.2 and 100 timed
# questions the default ran 37.0 min there (benchmarks/results/default_run_budget/): the teacher's 6 rounds
# took 7.6 min, smollm2 was cut from 120 to 71 steps (5.0 s/step) and still scored 67.5% (120 steps: 67.5%),
# the recovery from 300 to 98 (3.6 s/step). Where training runs ~3x slower (fp32 on CPUs without bf16) the
# students get about a third of those steps; what that costs is in the README.
TRACES_SHARE = 0.2
TRAIN_SHARE = 0.15
RECOVERY_SHARE = 0.15


RUN_MAX_SAMPLES = 6
# The run's default students: SmolLM2 self-distilled, and (DEFAULT_COMPRESS) the compact student cut from it.
# `nestling distill`'s from-scratch `tiny` is left out: on the multi-step default it learned nothing (8.5%
# held-out against the trivial baseline's 7.5%) for ~4 min of training, evaluation and exports.
RUN_STUDENTS = ["gguf:smollm2"]
# Each export answers this many held-out questions one at a time, in both modes: ~3 s a question for the
# five variants of the compact student (measured: 100 took 4.8 min, 50 took 2.6), so all 200 would take a
# third of the budget. 40 keep the latency medians stable; their accuracy is compared with the PyTorch
# student's on the same 40 (the whole split's accuracy is the PyTorch student's, on 200).
RUN_LATENCY_QUESTIONS = 40


@dataclass
class RunConfig(DistillConfig):
    """`nestling run`: traces -> train -> eval -> export -> report. Every field of `nestling distill`, plus
    the export and report ones; every field has a working default."""

    # Adaptive up to 6 samples by default: half the default mix is multi-step, where the bundled teacher
    # verifies a rationale for 12.5% of questions after one sample and ~30% after six, while the easy half
    # stops after ~2. Measured per 100 questions: ~204 easy + ~500 multi-step samples, about the teacher
    # tokens of the flat k=4 it replaces (~15k for 200 training questions; ~5.5 min at 2.4 rationales/s on 2
    # cores); up to 8 covers ~35% of the multi-step half for ~20% more teacher time.
    adaptive: bool = field(
        default=True,
        metadata={"help": "adaptive teacher sampling: more samples for unsolved questions (see traces)"},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "adaptive: most samples per question (default: 6 when adaptive)"}
    )
    # On by default for a gguf teacher: the bundled teacher decomposes three-term questions in two steps but
    # slips on the sums; with the calculator its greedy answers there went from 20% to 45% right and 35% of
    # its samples at T=0.7 were a right, fully checked two-step procedure (40 training questions,
    # benchmarks/bench_teacher_prompts.py). It costs teacher time: each correction restarts generation.
    teacher_calculator: bool | None = field(
        default=None,
        metadata={
            "help": "the teacher writes with the calculator in the loop (default: on for gguf teachers)"
        },
    )
    parity_prompts: int | None = field(
        default=None, metadata={"help": "held-out prompts each export is checked and scored on (export's 32)"}
    )
    recommend_within: float = field(
        default=0.02,
        metadata={"help": "recommend the export with the quickest answers within this accuracy of the best"},
    )
    students: list[str] = field(
        default_factory=lambda: list(RUN_STUDENTS),
        metadata={"help": "student specs, comma- or space-separated (see distill.students)"},
    )
    budget_minutes: float = field(
        default=30.0,
        metadata={
            "help": "wall-clock budget the stages that can stop early are sized to, at this machine's "
            f"measured speed, as shares of it: teacher sampling {TRACES_SHARE} (adaptive), students' "
            f"training {TRAIN_SHARE}, each compact recovery {RECOVERY_SHARE}; --budget-seconds and "
            "--train-minutes override their share; 0 = every stage runs its full recipe"
        },
    )
    latency_questions: int | None = field(
        default=RUN_LATENCY_QUESTIONS,
        metadata={
            "help": "held-out questions each export answers one at a time through Reasoner, timed and scored "
            "(its accuracy, beside the PyTorch student's on the same questions); 0 = all"
        },
    )
    compress: list[str] | None = field(
        default=None,
        metadata={
            "help": "compact students derived after training, SOURCE:LAYERS[:WIDTH[:STEPS]]: vocabulary "
            "trimmed, layers and MLP channels pruned by measured importance, recovered by KD (the budget's "
            "recovery share, or STEPS run whole); each is evaluated, exported and timed (SOURCE-trim "
            "evaluated). Default: smollm2:30:768 when smollm2 is trained; 'none' for no compact student"
        },
    )
    variants: list[str] | None = field(
        default=None,
        metadata={"help": "export variants of every deployed student (default: all of export's)"},
    )
    export_sources: bool = field(
        default=False,
        metadata={
            "help": "also export the students that compact ones were cut from, and their trims (evaluated "
            "either way; off by default: they are the compact student's teachers, not what one deploys)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adaptive and self.max_samples is None:
            self.max_samples = RUN_MAX_SAMPLES
        if self.teacher_calculator is None:
            self.teacher_calculator = (self.teacher or DEFAULT_TEACHER).startswith("gguf:")
        check(
            0.0 <= self.recommend_within <= 1.0,
            f"--recommend-within {self.recommend_within}: must be in [0, 1], e.g. 0.02",
        )
        check(
            self.budget_minutes >= 0, f"--budget-minutes {self.budget_minutes}: must be >= 0 (0: no budget)"
        )
        check(
            self.latency_questions is None or self.latency_questions >= 0,
            f"--latency-questions {self.latency_questions}: must be >= 0 (0 = all)",
        )
        if self.latency_questions == 0:
            self.latency_questions = None
        self._share_budget()
        if self.variants is not None:
            from nestling.export.pipeline import VARIANTS

            unknown = [v for v in self.variants if v not in VARIANTS]
            check(not unknown, f"--variants {unknown}: unknown; choose from {', '.join(VARIANTS)}")
            check(bool(self.variants), f"--variants: name at least one of {', '.join(VARIANTS)}")
        names = self.student_names()
        if self.compress is None:  # the default compact student, where its source is among the students
            self.compress = [item for item in DEFAULT_COMPRESS if parse_compress(item)[0] in names]
        elif [c.lower() for c in self.compress] == ["none"]:
            self.compress = []
        for item in self.compress:
            source = parse_compress(item)[0]
            check(source in names, f"--compress {item!r}: {source!r} is not one of the students {names}")

    def _share_budget(self) -> None:
        """--budget-minutes' shares, where the user set no budget of that stage's own."""
        if not self.budget_minutes:
            return
        if self.adaptive and self.budget_seconds is None and self.budget_tokens is None:
            self.budget_seconds = round(TRACES_SHARE * self.budget_minutes * 60, 1)
        if not self.train_minutes:
            self.train_minutes = round(TRAIN_SHARE * self.budget_minutes / len(self.students), 2)


# The embedded default's compact student: the self-distilled SmolLM2 with its vocabulary trimmed and half of
# every layer's MLP channels pruned (0.495x the teacher's parameters). Width pruning keeps what depth pruning
# loses: on the 200-question split, before recovery, 768 of 1536 channels kept 44.5% held-out accuracy while
# 18 of 30 layers kept 1.5%; after the same recovery, 68.0% against 50.5%.
DEFAULT_COMPRESS = ["smollm2:30:768"]


class CompressSpec(NamedTuple):
    """One --compress item: SOURCE:LAYERS[:WIDTH[:STEPS]]."""

    source: str
    layers: int
    width: int | None
    steps: int | None  # recovery steps, run whole: the budget's recovery share does not cut them


def parse_compress(item: str) -> CompressSpec:
    """SOURCE:LAYERS[:WIDTH[:STEPS]] -> its CompressSpec (WIDTH: MLP channels kept; STEPS: recovery steps)."""
    source, *numbers = item.split(":")
    check(
        bool(source)
        and 1 <= len(numbers) <= 3
        and all(n.isdigit() for n in numbers)
        and int(numbers[0]) >= 2
        and all(int(n) >= 1 for n in numbers[1:]),
        f"--compress {item!r}: write SOURCE:LAYERS[:WIDTH[:STEPS]] (a trained student, >= 2 layers, MLP "
        "channels kept, recovery steps run whole), e.g. smollm2:30:768 or smollm2:25:256:600",
    )
    values = [int(n) for n in numbers] + [None] * (3 - len(numbers))
    return CompressSpec(source, values[0], values[1], values[2])


def check_compress_shapes(items: list[str], shapes: dict[str, StudentShape]) -> None:
    """Each SOURCE:LAYERS[:WIDTH] within its source's layers and MLP channels (where the source's shape
    is known before training: presets, local checkpoints, GGUF files)."""
    for item in items:
        source, layers, width, _ = parse_compress(item)
        shape = shapes[source]
        check(
            shape.layers is None or layers <= shape.layers,
            f"--compress {item!r}: keeps {layers} layers but {source!r} has only {shape.layers}",
        )
        check(
            width is None or shape.intermediate_size is None or width <= shape.intermediate_size,
            f"--compress {item!r}: keeps {width} MLP channels but {source!r} has only "
            f"{shape.intermediate_size} per layer",
        )


def _overrides(cfg: RunConfig, target: type) -> dict[str, Any]:
    """RunConfig values the user set, for the stage config fields of the same name."""
    names = {f.name for f in fields(target) if f.init} - {"out"}
    return {k: v for k, v in asdict(cfg).items() if v is not None and k in names}


def run(cfg: RunConfig) -> dict[str, Any]:
    """Distil (traces, students, eval), cut the compact students, export and time (and score) the deployable
    ones, then write report.{json,md,png} in cfg.out."""
    from nestling.distill.accel import is_main_process
    from nestling.distill.pipeline import check_sources, check_students, run_distill
    from nestling.distill.tasks import TaskScorer
    from nestling.export.pipeline import ExportConfig, export_student

    run_dir = Path(cfg.out)
    dcfg = DistillConfig(out=cfg.out, **_overrides(cfg, DistillConfig))
    if is_main_process():  # every spec checked before the teacher is asked anything
        check_compress_shapes(cfg.compress or [], check_students(dcfg))
        check_sources(dcfg)
    distilled = run_distill(dcfg, checked=True)
    if not is_main_process():  # under a launcher every rank trains; rank 0 alone exports and reports
        return {}
    compact, sources = _compress(cfg, distilled["students"])
    students = {**distilled["students"], **compact, **sources}
    if not cfg.export_sources:  # the compact students' teachers are evaluated, not deployed
        students = {k: v for k, v in students.items() if k not in sources}
    rows = _heldout_rows(run_dir, cfg.latency_questions)
    questions, score = [r["question"] for r in rows], TaskScorer().by_index(rows)
    for name, student_dir in students.items():
        out = RunDir(run_dir).export(name)
        export_student(ExportConfig(student=str(student_dir), out=str(out), **_overrides(cfg, ExportConfig)))
        measure_export(out, questions, n_threads=1, cache=RunDir(run_dir).latency(name), score=score)
        measure_calculator(out, questions, n_threads=1, cache=RunDir(run_dir).calculator(name), score=score)
    return write_report(run_dir, collect_report(run_dir), cfg.recommend_within)


def _compress(cfg: RunConfig, trained: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Compact students derived from trained ones, then evaluated beside them (evaluation is cached per
    student, so the trained ones are not scored again), with each source's lossless trim under
    --export-sources. Returns (compact students, their sources and the sources' trims)."""
    if not cfg.compress:
        return {}, {}
    from nestling.distill.compress import CompressConfig, compress, trim_name
    from nestling.distill.evaluate import EvalConfig, evaluate

    made: dict[str, Path] = {}
    sources: dict[str, Path] = {}
    for item in cfg.compress:
        spec = parse_compress(item)
        source = spec.source
        ccfg = CompressConfig(
            run=cfg.out,
            source=source,
            keep_layers=spec.layers,
            intermediate_size=spec.width,
            **(
                {"recover_steps": spec.steps}
                if spec.steps
                else {"recover_minutes": round(RECOVERY_SHARE * cfg.budget_minutes, 2)}
            ),
            seed=cfg.seed,
            precision=cfg.precision,
            threads=cfg.threads,
        )
        if spec.steps:  # a fixed recipe gets its own directory, so it never resumes onto a budgeted one
            ccfg.name = f"{ccfg.name}-r{spec.steps}"
        made[str(ccfg.name)] = compress(ccfg) / "model"
        sources[source] = trained[source]
        sources[trim_name(source)] = RunDir(cfg.out).student(trim_name(source)) / "model"
    evaluate(
        EvalConfig(
            run=cfg.out,
            students=list(dict.fromkeys([*trained, *made, *(sources if cfg.export_sources else [])])),
            teacher=cfg.teacher,
            limit=cfg.eval_limit,
            threads=cfg.threads,
        )
    )
    return made, sources


def _heldout_rows(run_dir: Path, n: int | None) -> list[dict[str, Any]]:
    return RunDir(run_dir).heldout()[:n]
