"""`nestling run`: the one command, traces -> train -> eval -> export -> report, every field defaulted.

nestling run --out runs/default
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nestling.latency import measure_export
from nestling.report import collect_report, write_report
from nestling.serve.manifest import read_jsonl


@dataclass
class RunConfig:
    """`nestling run`: traces -> train -> eval -> export -> report. Every field has a working default."""

    out: str = field(default="runs/default", metadata={"help": "run directory (re-run to resume)"})
    task: str | None = field(default=None, metadata={"help": "task spec; default: the embedded easy mix"})
    teacher: str | None = field(
        default=None, metadata={"help": "teacher spec; default: gguf:smollm2 (bundled)"}
    )
    students: list[str] | None = field(default=None, metadata={"help": "student specs; default: distill's"})
    objective: str | None = field(default=None, metadata={"help": "cot | multitask | answer-only"})
    samples: int | None = field(default=None, metadata={"help": "teacher samples per question (k)"})
    n: int | None = field(default=None, metadata={"help": "questions to draw (train + held-out)"})
    heldout: float | None = field(
        default=None, metadata={"help": "held-out questions: a fraction < 1 or a count (traces' default 0.2)"}
    )
    concurrency: int | None = field(default=None, metadata={"help": "openai teachers: requests in flight"})
    request_extra: str | None = field(
        default=None, metadata={"help": "openai teachers: JSON object merged into every request body"}
    )
    rationale_style: str | None = field(
        default=None, metadata={"help": "full | short: what rows train on when the teacher writes a chain"}
    )
    lora: bool = field(default=False, metadata={"help": "LoRA adapters for pretrained students"})
    precision: str | None = field(default=None, metadata={"help": "auto | fp32 | bf16 (default auto)"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling, splits and training"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads per process"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps for every student"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate at most this many questions"})
    parity_prompts: int | None = field(
        default=None, metadata={"help": "held-out prompts each export is checked and scored on"}
    )
    recommend_within: float = field(
        default=0.02,
        metadata={"help": "recommend the export with the quickest answers within this accuracy of the best"},
    )
    latency_questions: int = field(
        default=20, metadata={"help": "held-out questions each export answers one at a time, timed"}
    )

    def __post_init__(self) -> None:
        from nestling.serve.config import check

        check(
            0.0 <= self.recommend_within <= 1.0,
            f"--recommend-within {self.recommend_within}: must be in [0, 1], e.g. 0.02",
        )
        check(self.latency_questions >= 1, f"--latency-questions {self.latency_questions}: must be >= 1")


def _overrides(cfg: RunConfig, target: type) -> dict[str, Any]:
    """RunConfig values the user set, for the stage config fields of the same name."""
    names = {f.name for f in fields(target) if f.init} - {"out"}
    return {k: v for k, v in asdict(cfg).items() if v is not None and k in names}


def run(cfg: RunConfig) -> dict[str, Any]:
    """Distil (traces, students, eval), export every student, then write report.{json,md,png} in cfg.out."""
    from nestling.distill.accel import is_main_process
    from nestling.distill.pipeline import DistillConfig, run_distill
    from nestling.export.pipeline import ExportConfig, export_student

    run_dir = Path(cfg.out)
    distilled = run_distill(DistillConfig(out=cfg.out, **_overrides(cfg, DistillConfig)))
    if not is_main_process():  # under a launcher every rank trains; rank 0 alone exports and reports
        return {}
    questions = _heldout_questions(run_dir, cfg.latency_questions)
    for name, student_dir in distilled["students"].items():
        out = run_dir / "exports" / name
        export_student(ExportConfig(student=str(student_dir), out=str(out), **_overrides(cfg, ExportConfig)))
        measure_export(out, questions, n_threads=1, cache=run_dir / "latency" / f"{name}.json")
    return write_report(run_dir, collect_report(run_dir), cfg.recommend_within)


def _heldout_questions(run_dir: Path, n: int) -> list[str]:
    rows = read_jsonl(run_dir / "traces" / "questions.jsonl", fix="re-run `nestling traces`")
    return [r["question"] for r in rows if r.get("split") == "heldout"][:n]
