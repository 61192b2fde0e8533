"""`nestling run`: the one command, traces -> train -> eval -> export -> report, every field defaulted.

nestling run --out runs/default
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nestling.distill.pipeline import DistillConfig
from nestling.latency import measure_export
from nestling.report import collect_report, write_report
from nestling.serve.config import check
from nestling.serve.manifest import read_jsonl


@dataclass
class RunConfig(DistillConfig):
    """`nestling run`: traces -> train -> eval -> export -> report. Every field of `nestling distill`, plus
    the export and report ones; every field has a working default."""

    parity_prompts: int | None = field(
        default=None, metadata={"help": "held-out prompts each export is checked and scored on (export's 32)"}
    )
    recommend_within: float = field(
        default=0.02,
        metadata={"help": "recommend the export with the quickest answers within this accuracy of the best"},
    )
    latency_questions: int = field(
        default=20, metadata={"help": "held-out questions each export answers one at a time, timed"}
    )
    compress: list[str] = field(
        default_factory=list,
        metadata={
            "help": "compact students derived after training, SOURCE:LAYERS (e.g. smollm2:18): vocabulary "
            "trimmed, layers pruned, recovered by KD; each (and SOURCE-trim) is evaluated, exported and timed"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            0.0 <= self.recommend_within <= 1.0,
            f"--recommend-within {self.recommend_within}: must be in [0, 1], e.g. 0.02",
        )
        check(self.latency_questions >= 1, f"--latency-questions {self.latency_questions}: must be >= 1")
        for item in self.compress:
            source, _, layers = item.partition(":")
            check(
                bool(source) and layers.isdigit() and int(layers) >= 2,
                f"--compress {item!r}: write SOURCE:LAYERS (a trained student, >= 2 layers), e.g. smollm2:18",
            )


def _overrides(cfg: RunConfig, target: type) -> dict[str, Any]:
    """RunConfig values the user set, for the stage config fields of the same name."""
    names = {f.name for f in fields(target) if f.init} - {"out"}
    return {k: v for k, v in asdict(cfg).items() if v is not None and k in names}


def run(cfg: RunConfig) -> dict[str, Any]:
    """Distil (traces, students, eval), export every student, then write report.{json,md,png} in cfg.out."""
    from nestling.distill.accel import is_main_process
    from nestling.distill.pipeline import run_distill
    from nestling.export.pipeline import ExportConfig, export_student

    run_dir = Path(cfg.out)
    distilled = run_distill(DistillConfig(out=cfg.out, **_overrides(cfg, DistillConfig)))
    if not is_main_process():  # under a launcher every rank trains; rank 0 alone exports and reports
        return {}
    students = {**distilled["students"], **_compress(cfg, list(distilled["students"]))}
    questions = _heldout_questions(run_dir, cfg.latency_questions)
    for name, student_dir in students.items():
        out = run_dir / "exports" / name
        export_student(ExportConfig(student=str(student_dir), out=str(out), **_overrides(cfg, ExportConfig)))
        measure_export(out, questions, n_threads=1, cache=run_dir / "latency" / f"{name}.json")
    return write_report(run_dir, collect_report(run_dir), cfg.recommend_within)


def _compress(cfg: RunConfig, trained: list[str]) -> dict[str, Path]:
    """Compact students (and each source's lossless trim) derived from trained ones, then evaluated beside
    them (evaluation is cached per student, so the trained ones are not scored again)."""
    if not cfg.compress:
        return {}
    from nestling.distill.compress import CompressConfig, compress
    from nestling.distill.evaluate import EvalConfig, evaluate

    made: dict[str, Path] = {}
    for item in cfg.compress:
        source, _, layers = item.partition(":")
        ccfg = CompressConfig(
            run=cfg.out, source=source, keep_layers=int(layers), seed=cfg.seed, threads=cfg.threads
        )
        made[str(ccfg.name)] = compress(ccfg) / "model"
        made[f"{source}-trim"] = Path(cfg.out) / "students" / f"{source}-trim" / "model"
    evaluate(
        EvalConfig(
            run=cfg.out,
            students=[*trained, *made],
            teacher=cfg.teacher,
            limit=cfg.eval_limit,
            threads=cfg.threads,
        )
    )
    return made


def _heldout_questions(run_dir: Path, n: int) -> list[str]:
    rows = read_jsonl(run_dir / "traces" / "questions.jsonl", fix="re-run `nestling traces`")
    return [r["question"] for r in rows if r.get("split") == "heldout"][:n]
