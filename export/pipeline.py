"""`nestling export STUDENT_DIR --out DIR`: every artifact, checked against the PyTorch student.

    manifest = export_student(ExportConfig(student="runs/x/students/tiny/model", out="runs/x/exports/tiny"))

First ``preflight`` refuses, in about a second and before anything is written, what the GGUF writer could
not reproduce (family, config, tensors, a tokenizer llama.cpp would not tokenize exactly like HF); the message
names ``--variants`` to skip GGUF knowingly. Then it builds ONNX fp32/int8 and GGUF f16/Q8_0/Q4_K_M in
``OUT.tmp-XXXX``, runs each through ``serve.engines``
against PyTorch on held-out prompts (``export.parity``), writes the Modelfile, the model card and
manifest.json, and only then renames the directory to OUT. An unquantized artifact that does not match
PyTorch raises NestlingError and leaves no OUT behind. A complete OUT with the same config and student is
skipped.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestling.distill.students import check_student_dir
from nestling.export.parity import (
    Prompt,
    VariantResult,
    check_variant,
    raise_on_failures,
    torch_reference,
)

from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.manifest import (
    describe_files,
    fingerprint,
    is_fresh,
    read_json,
    read_jsonl,
    read_manifest,
    write_manifest,
)
from nestling.core.prompting import PROMPT_FORMAT
from nestling.core.rundir import RunDir

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, str]] = {
    "onnx-fp32": {"engine": "onnx", "path": "onnx/fp32"},
    "onnx-int8": {"engine": "onnx", "path": "onnx/int8"},
    "gguf-f16": {"engine": "gguf", "path": "gguf/model-f16.gguf"},
    "gguf-q8_0": {"engine": "gguf", "path": "gguf/model-q8_0.gguf"},
    "gguf-q4_k_m": {"engine": "gguf", "path": "gguf/model-q4_k_m.gguf"},
}
EXACT = {"onnx-fp32", "gguf-f16"}  # unquantized: must match PyTorch or the export fails
MIN_TOP1 = 0.95  # a default variant must agree with PyTorch's next token this often, teacher-forced
SOURCE_OF = {"onnx-int8": "onnx-fp32", "gguf-q8_0": "gguf-f16", "gguf-q4_k_m": "gguf-f16"}

BUILTIN_QUESTIONS = [
    ("What is 3 + 4?", "7"),
    ("What is 9 - 2?", "7"),
    ("What is 6 * 7?", "42"),
    ("What is 8 + 5?", "13"),
    ("What is 12 - 9?", "3"),
    ("What is 2 * 9?", "18"),
    ("What is 15 + 27?", "42"),
    ("What is 100 - 1?", "99"),
]


@dataclass
class ExportConfig:
    """`nestling export`: ONNX + GGUF artifacts of one student, parity-checked at export time."""

    student: str = field(
        default="",
        metadata={
            "help": "student directory in save_pretrained form",
            "positional": True,
            "required": True,
            "metavar": "STUDENT_DIR",
        },
    )
    out: str = field(
        default="", metadata={"help": "export directory to create (built as OUT.tmp-*)", "required": True}
    )
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": f"which of {', '.join(VARIANTS)}"}
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "held-out prompts for parity: .jsonl with question (+gold) or .txt, one question a line; "
            "default: RUN/traces/questions.jsonl split heldout, else built-in arithmetic"
        },
    )
    task: str | None = field(
        default=None, metadata={"help": "task spec for scoring (default: the questions' own task)"}
    )
    parity_prompts: int = field(default=32, metadata={"help": "how many held-out prompts to check"})
    max_new_tokens: int = field(default=96, metadata={"help": "greedy tokens per parity prompt"})
    threads: int = field(default=1, metadata={"help": "CPU threads for every engine (tokens/s are per this)"})
    fp32_logit_tol: float = field(
        default=1e-3, metadata={"help": "max |logit diff| allowed for onnx-fp32 vs PyTorch"}
    )
    f16_logit_tol: float = field(
        default=0.03,
        metadata={"help": "max |logit diff| for gguf-f16 vs PyTorch, as a share of the largest |logit|"},
    )
    tolerance: float = field(
        default=0.02,
        metadata={"help": "default variant: the fastest whose held-out accuracy is within this of PyTorch's"},
    )
    gguf_pre: str | None = field(
        default=None, metadata={"help": "override llama.cpp's tokenizer.ggml.pre (default: detected)"}
    )
    # weight-only-int8 by measurement: on SmolLM2-135M it stays closest to PyTorch (greedy and teacher-forced)
    # of the int8 recipes at dynamic's speed; figures: benchmarks/results/families_int8.json (bench_int8.py).
    onnx_int8: str = field(
        default="weight-only-int8",
        metadata={"help": "int8 ONNX recipe: dynamic, dynamic-fp32-down, weight-only, weight-only-int8"},
    )
    force: bool = field(default=False, metadata={"help": "re-export even when OUT is complete and fresh"})

    def __post_init__(self) -> None:
        check(bool(self.student), "export: pass the student directory, e.g. runs/x/students/tiny/model")
        check(bool(self.out), "export: pass --out DIR, e.g. runs/x/exports/tiny")
        unknown = [v for v in self.variants if v not in VARIANTS]
        check(not unknown, f"--variants {unknown}: unknown; choose from {', '.join(VARIANTS)}")
        check(bool(self.variants), f"--variants: name at least one of {', '.join(VARIANTS)}")
        check(self.parity_prompts >= 1, f"--parity-prompts {self.parity_prompts}: must be >= 1")
        check(self.max_new_tokens >= 1, f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        check(self.threads >= 1, f"--threads {self.threads}: must be >= 1")
        check(self.fp32_logit_tol > 0 and self.f16_logit_tol > 0, "logit tolerances must be > 0")
        check(0.0 <= self.tolerance <= 1.0, f"--tolerance {self.tolerance}: must be in [0, 1], e.g. 0.02")
        check(
            Path(self.student).resolve() != Path(self.out).resolve(), "--out must differ from the student dir"
        )
        from nestling.export.onnx import INT8_RECIPES

        check(
            self.onnx_int8 in INT8_RECIPES,
            f"--onnx-int8 {self.onnx_int8!r}: use one of {', '.join(INT8_RECIPES)}",
        )


# ---- inputs ------------------------------------------------------------------------------------------


def student_fingerprint(d: Path) -> str:
    """sha256 over every file of the student directory (names and contents)."""
    files = [p.relative_to(d).as_posix() for p in sorted(d.rglob("*")) if p.is_file()]
    return fingerprint({k: v["sha256"] for k, v in describe_files(d, files).items()})


def _student_name(student_dir: Path) -> str:
    d = student_dir.resolve()
    if d.name == "model" and d.parent.parent.name == "students":
        return d.parent.name
    return d.name


def load_prompts(
    cfg: ExportConfig, given: list[tuple[str, str]] | None
) -> tuple[list[Prompt], str, str | None]:
    """(prompts, where they came from, task spec)."""
    n = cfg.parity_prompts
    if given is not None:
        return [Prompt(q, g) for q, g in given[:n]], "given by the caller", cfg.task
    if cfg.prompts:
        p = Path(cfg.prompts)
        if not p.is_file():
            raise NestlingError(f"--prompts {p}: file not found; pass a .jsonl (question, gold) or .txt file")
        if p.suffix == ".jsonl":
            rows = read_jsonl(p)
            bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or "question" not in r]
            if bad:
                raise NestlingError(f"--prompts {p}: line {bad[0] + 1} has no 'question' field")
            return _rows_to_prompts(rows[:n], cfg.task), str(p), cfg.task
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise NestlingError(f"--prompts {p}: empty; put one question per line")
        return [Prompt(q, None) for q in lines[:n]], str(p), cfg.task
    run = RunDir.of_student(cfg.student)
    if run is not None:
        qpath, rows = run.questions_file, run.heldout()
        if rows:
            random.Random(0).shuffle(rows)
            task = cfg.task or (rows[0].get("task") if len({r.get("task") for r in rows}) == 1 else None)
            return _rows_to_prompts(rows[:n], task), f"{qpath} (split heldout)", task
    return [Prompt(q, g) for q, g in BUILTIN_QUESTIONS[:n]], "built-in arithmetic questions", cfg.task


def _rows_to_prompts(rows: list[dict[str, Any]], task: str | None) -> list[Prompt]:
    out = []
    for i, r in enumerate(rows):
        example = None
        if r.get("task") or task:
            try:
                from nestling.distill.tasks import Example

                example = Example.from_row({"id": r.get("id", f"p{i}"), "task": r.get("task") or task, **r})
            except (ImportError, NestlingError):
                example = None
        gold = r.get("gold")
        out.append(Prompt(str(r["question"]), None if gold is None else str(gold), example=example))
    return out


# ---- the export --------------------------------------------------------------------------------------


def _build(name: str, cfg: ExportConfig, student: Path, root: Path) -> Path:
    from nestling.export.gguf import quantize_gguf, source_gguf, write_gguf
    from nestling.export.onnx import INT8_RECIPES, export_onnx_fp32, quantize_onnx_int8

    dst = root / VARIANTS[name]["path"]
    if name == "onnx-fp32":
        return export_onnx_fp32(student, dst)
    if name == "onnx-int8":
        return quantize_onnx_int8(root / VARIANTS["onnx-fp32"]["path"], dst, **INT8_RECIPES[cfg.onnx_int8])
    if name == "gguf-f16":
        return write_gguf(student, dst, dtype="f16", pre=cfg.gguf_pre, source=source_gguf(student))
    return quantize_gguf(root / VARIANTS["gguf-f16"]["path"], dst, name.removeprefix("gguf-"), cfg.threads)


def _bytes(p: Path) -> int:
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if p.is_dir() else p.stat().st_size


def fastest_within(entries: dict[str, dict[str, Any]], tolerance: float) -> str | None:
    """The one rule that picks a variant: export's default (what `nestling serve` loads) and the run report's
    recommendation both call it. Among entries that agree with PyTorch's next token at least MIN_TOP1 of the
    time, teacher-forced (where parity was measured: accuracy alone says little when a student scores near
    zero) and whose ``accuracy_delta`` (accuracy minus the reference's; None where unscored) is within
    `tolerance`, the quickest: median seconds per explained answer where timed (what a user waits for),
    else decode tokens/s. None when no entry qualifies."""
    ok = {
        k: v
        for k, v in entries.items()
        if speed_key(v) is not None
        and (v.get("accuracy_delta") is None or v["accuracy_delta"] >= -tolerance - 1e-9)
        and (v.get("parity") or {}).get("teacher_forced_top1", 1.0) >= MIN_TOP1
    }
    return min(ok, key=lambda k: speed_key(ok[k])) if ok else None  # type: ignore[arg-type, return-value]


def speed_key(e: dict[str, Any]) -> tuple[int, float] | None:
    """A sort key, lower is quicker: timed answers first (seconds), then untimed ones by 1 / tokens/s."""
    seconds = (e.get("answer_s") or {}).get("explain")
    if seconds:
        return (0, seconds)
    return (1, 1.0 / e["tokens_per_s"]) if e.get("tokens_per_s") else None


def choose_default(variants: dict[str, dict[str, Any]], tolerance: float, engine: str | None = None) -> str:
    """The variant (of `engine`, if given) `nestling serve` loads: fastest_within against PyTorch's accuracy
    on the parity prompts; gguf-q8_0 when none qualifies, then the first variant."""
    pool = {k: v for k, v in variants.items() if engine in (None, v["engine"])}
    return fastest_within(pool, tolerance) or ("gguf-q8_0" if "gguf-q8_0" in pool else next(iter(pool)))


def export_config_dict(cfg: ExportConfig) -> dict[str, Any]:
    """What the manifest records as config: everything but the paths (the student's hash is an input)."""
    d = asdict(cfg)
    for k in ("student", "out", "force"):
        d.pop(k)
    return d


def _publish(tmp: Path, out: Path) -> None:
    """Make the finished `tmp` appear as `out` in one rename. An older export is moved aside first and
    deleted only once the new one is in place; if the rename fails it is put back."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def preflight(cfg: ExportConfig, prompts: Sequence[Prompt] = ()) -> None:
    """Refuse, in about a second and before any artifact, what a wanted variant could not write: the GGUF
    writer's family, config, tensor and tokenizer checks (llama.cpp must tokenize the probes and prompts
    exactly like HF). The message says how to skip GGUF knowingly."""
    wanted = set(cfg.variants) | {SOURCE_OF[v] for v in cfg.variants if v in SOURCE_OF}
    if not any(VARIANTS[v]["engine"] == "gguf" for v in wanted):
        return
    from nestling.export.gguf import check_gguf_writable, check_student_weights, source_gguf

    check_student_weights(cfg.student)  # not a GGUF limit: no --variants advice
    onnx_only = " ".join(v for v in VARIANTS if VARIANTS[v]["engine"] == "onnx")
    try:
        source = source_gguf(cfg.student)
        check_gguf_writable(cfg.student, cfg.gguf_pre, [p.text for p in prompts], source)
    except NestlingError as e:
        raise NestlingError(
            f"GGUF export refused: {e}; to export ONNX only pass --variants {onnx_only}"
        ) from None


def export_student(cfg: ExportConfig, prompts: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Export, check and publish one student; returns the manifest. See the module docstring."""
    from nestling.serve.engines import load_engine

    student, out = Path(cfg.student), Path(cfg.out)
    check_student_dir(student)
    plist, source, task = load_prompts(cfg, prompts)
    config = export_config_dict(cfg)
    inputs = {
        "student": student_fingerprint(student),
        "prompts": fingerprint([(p.text, p.gold) for p in plist]),
    }
    if not cfg.force and is_fresh(out, "export", config, inputs):
        log.info("%s: complete and matching this student and config; skipped", out)
        return read_manifest(out, "export")
    preflight(cfg, plist)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published export is an ordinary directory
    t0 = time.perf_counter()
    try:
        job = _Job(tmp, cfg, student, plist, source, task, config, inputs, load_engine)
        manifest = _export_into(job)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "export %s: done in %.0f s, default variant %s",
        out,
        time.perf_counter() - t0,
        manifest["default_variant"],
    )
    return read_manifest(out, "export")


@dataclass
class _Job:
    """One export being built in `root`: what it is checked against and what its manifest records."""

    root: Path
    cfg: ExportConfig
    student: Path
    prompts: list[Prompt]
    source: str
    task: str | None
    config: dict[str, Any]
    inputs: dict[str, Any]
    load_engine: Any


@dataclass
class _Reference:
    """The PyTorch student's side of every check."""

    ref: Any
    tok: Any
    scorer: Any
    params: int
    family: str
    f16_tol: float


PARITY_KEYS = (
    "tokenization_match",
    "greedy_match",
    "greedy_match_within_tol",
    "teacher_forced_top1",
    "max_abs_logit_diff",
    "logit_tol",
    "exact_required",
    "greedy_divergences",
)


def _export_into(job: _Job) -> dict[str, Any]:
    """Reference -> build and check every needed variant -> ship the wanted ones -> card and manifest."""
    t0 = time.perf_counter()
    torch_ref = _reference(job)
    wanted = [v for v in VARIANTS if v in job.cfg.variants]
    results = _build_and_check(job, torch_ref, wanted)
    variants = {name: _variant_entry(job.root, name, results[name]) for name in wanted}
    return _write_outputs(job, torch_ref, variants, time.perf_counter() - t0)


def _reference(job: _Job) -> _Reference:
    import numpy as np
    import torch
    from nestling.distill.students import count_params, load_student

    torch.set_num_threads(job.cfg.threads)
    model, tok = load_student(job.student)
    from nestling.distill.tasks import TaskScorer

    scorer = TaskScorer()
    ref = torch_reference(model, tok, job.prompts, job.cfg.max_new_tokens, scorer)
    # f16 rounding moves logits in proportion to their size: a trained student's logits reach tens, where an
    # absolute bound that suits a fresh one fails. Scale by the largest PyTorch logit (at least 1).
    logit_scale = max([1.0, *(float(np.abs(x).max()) for x in ref.logits)])
    return _Reference(
        ref, tok, scorer, count_params(model), model.config.model_type, job.cfg.f16_logit_tol * logit_scale
    )


def _build_and_check(job: _Job, r: _Reference, wanted: list[str]) -> dict[str, VariantResult]:
    """Every wanted variant and its prerequisites, each checked; a prerequisite that is not shipped (f16 for
    Q8_0) is checked too: a quantized file is only as right as the conversion it was made from."""
    needed = [v for v in VARIANTS if v in wanted or v in {SOURCE_OF.get(w) for w in wanted}]
    results: dict[str, VariantResult] = {}
    for name in needed:
        t = time.perf_counter()
        path = _build(name, job.cfg, job.student, job.root)
        log.info("built %s in %.1f s", name, time.perf_counter() - t)
        tol = job.cfg.fp32_logit_tol if name == "onnx-fp32" else r.f16_tol if name == "gguf-f16" else None
        engine = job.load_engine(path, kind=VARIANTS[name]["engine"], n_threads=job.cfg.threads)
        try:
            results[name] = check_variant(
                name, engine, r.ref, r.tok, job.prompts, max_new_tokens=job.cfg.max_new_tokens,
                logit_tol=tol, exact=name in EXACT, scorer=r.scorer,
            )  # fmt: skip
        finally:
            engine.close()
    raise_on_failures(results)
    for name in set(needed) - set(wanted):
        p = job.root / VARIANTS[name]["path"]
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return results


def _variant_entry(root: Path, name: str, result: VariantResult) -> dict[str, Any]:
    r = result.to_dict()
    return {
        **VARIANTS[name],
        "bytes": _bytes(root / VARIANTS[name]["path"]),
        "parity": {k: r[k] for k in PARITY_KEYS},
        "accuracy": r["accuracy"],
        "accuracy_delta": r["accuracy_delta"],
        "tokens_per_s": round(r["tokens_per_s"], 1),
    }


def _read_datacard(student: Path) -> dict[str, Any] | None:
    run = RunDir.of_student(student)
    if run is None:
        return None
    try:
        return read_json(run.datacard, default=None)
    except NestlingError as e:
        log.warning("%s; the model card omits the data card", e)
        return None


def _write_outputs(
    job: _Job, r: _Reference, variants: dict[str, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """Modelfile (when a GGUF ships), the model card and the manifest."""
    from nestling.export.card import model_card, modelfile

    cfg, root = job.cfg, job.root
    default = choose_default(variants, cfg.tolerance)
    name = _student_name(job.student)
    student_info = {"name": name, "sha256": job.inputs["student"], "params": r.params, "family": r.family}
    pytorch = {
        "accuracy": r.ref.accuracy,
        "tokens_per_s": round(r.ref.tokens_per_s, 1),
        "bytes": sum(p.stat().st_size for p in job.student.glob("*.safetensors")),
        "params": r.params,
    }
    files = [VARIANTS[v]["path"] for v in variants]
    if any(v["engine"] == "gguf" for v in variants.values()):
        gguf_default = choose_default(variants, cfg.tolerance, engine="gguf")
        (root / "Modelfile").write_text(modelfile(VARIANTS[gguf_default]["path"], r.tok.eos_token))
        files.append("Modelfile")
    card = model_card(
        name, student_info, job.task, variants, default, pytorch, _read_datacard(job.student), job.source,
        len(job.prompts), cfg.threads,
    )  # fmt: skip
    (root / "README.md").write_text(card)
    files.append("README.md")
    metrics = {
        "pytorch": pytorch,
        "parity_prompts": len(job.prompts),
        "prompt_source": job.source,
        "seconds": round(seconds, 1),
    }
    return write_manifest(
        root, stage="export", config=job.config, inputs=job.inputs, files=files, metrics=metrics,
        prompt_format=PROMPT_FORMAT, student=student_info, task=job.task, default_variant=default,
        variants=variants,
    )  # fmt: skip
