"""Held-out evaluation: the teacher (greedy), the trivial baseline and each student in both modes.

    nestling eval --run runs/x                    # every student under runs/x/students/
    nestling eval --run runs/x --students tiny --limit 50

For each held-out question of RUN/traces/questions.jsonl: the teacher answers greedily with its own prompt
(cached in RUN/teacher_eval.json, keyed by teacher spec + questions, because it is the slow part); each
student answers greedily under the answer prompt and under the explain prompt. Scored by the task's own
verifier (task.extract + task.score, full credit only). Explanations are parsed into steps and checked by
core.explain, the same checks the runtime shows. Writes RUN/students/<name>/eval.{json,md} and
RUN/eval.{json,md} (the side-by-side table); every eval.json carries "stage": "eval".

The trivial baseline answers every question with the most common gold answer of the training split (per
task): a model that does not beat it has learned nothing.

Every accuracy carries its 95% Wilson interval (``accuracy_ci``), so two rows can be compared: intervals
that overlap are not a measured difference. The teacher runs through teachers.stream, the same concurrent,
pipelined path as the traces stage.

This module runs the models; scoring is distill.scoring (answers by distill.tasks.TaskScorer), the interval
distill.stats.wilson, the Markdown distill.tables.

No gold answers (e.g. a file: task without an answer column): the held-out questions are labelled by the
teacher's self-consistency vote (k samples at the traces' temperature, majority share >= the traces'
vote threshold; cached in RUN/teacher_vote.json), questions without a majority are left out, and every table
and eval.json says that the reference is the teacher's vote, not gold.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestling.distill.scoring import score_outputs
from nestling.distill.stats import wilson
from nestling.distill.tables import student_md, summary_table
from nestling.distill.tasks import Example, TaskScorer, trivial_baseline

from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.manifest import (
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    read_cache,
    try_read_manifest,
    write_cache,
)
from nestling.core.prompting import student_prompt
from nestling.core.rundir import RunDir

log = logging.getLogger(__name__)

MODES = ("answer", "explain")


@dataclass
class EvalConfig:
    """`nestling eval`: teacher, baseline and students on the held-out split of a run directory."""

    run: str = field(default="runs/default", metadata={"help": "run directory (traces/ and students/)"})
    students: list[str] | None = field(
        default=None, metadata={"help": "student names under RUN/students (default: all trained ones)"}
    )
    teacher: str | None = field(
        default=None,
        metadata={"help": "teacher spec (default: the one that wrote the traces); 'none' skips the teacher"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "evaluate at most this many held-out questions"}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "explain-mode generation budget per question"})
    teacher_max_tokens: int | None = field(
        default=None, metadata={"help": "teacher generation budget (default: the traces stage's, else 256)"}
    )
    batch_size: int = field(default=32, metadata={"help": "student questions generated together"})
    latency_samples: int = field(default=5, metadata={"help": "questions timed one at a time for latency"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default min(2, cores))"})
    teacher_concurrency: int | None = field(
        default=None, metadata={"help": "openai: teacher requests in flight (default: the backend's, 8)"}
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check(self.limit is None or self.limit > 0, f"--limit {self.limit}: must be > 0")
        check(self.max_new_tokens > 0, f"--max-new-tokens {self.max_new_tokens}: must be > 0")
        check(
            self.teacher_max_tokens is None or self.teacher_max_tokens > 0,
            f"--teacher-max-tokens {self.teacher_max_tokens}: must be > 0",
        )
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.latency_samples >= 0, f"--latency-samples {self.latency_samples}: must be >= 0")
        check(self.threads is None or self.threads > 0, f"--threads {self.threads}: must be > 0")
        check(
            self.teacher_concurrency is None or self.teacher_concurrency > 0,
            f"--teacher-concurrency {self.teacher_concurrency}: must be > 0",
        )


# ---- teacher -------------------------------------------------------------------------------------------


def traces_config(run: Path) -> dict[str, Any]:
    """The traces stage's resolved config (teacher, prompt, budget), {} when its manifest is absent."""
    return dict((try_read_manifest(RunDir(run).traces) or {}).get("config") or {})


def default_teacher(run: Path) -> str:
    """The teacher that wrote the traces (their manifest records it), else the bundled SmolLM2."""
    return str(traces_config(run).get("teacher") or "gguf:smollm2")


def _teacher_setup(run: Path, spec: str, cfg: EvalConfig) -> tuple[bool, int, dict[str, Any]]:
    """(fewshot, max_tokens, load_teacher options): the prompt, budget and request fields of the traces."""
    from nestling.distill.teachers import default_max_tokens, teacher_options

    tcfg = traces_config(run)
    fewshot = bool(tcfg.get("fewshot", True))
    max_tokens = cfg.teacher_max_tokens or int(tcfg.get("max_tokens") or default_max_tokens(spec))
    extra = None
    if tcfg.get("request_extra") and spec == tcfg.get("teacher"):
        extra = json.loads(tcfg["request_extra"])
    opts = teacher_options(spec, max_tokens, concurrency=cfg.teacher_concurrency, extra=extra)
    return fewshot, max_tokens, opts


def run_teacher(
    spec: str,
    rows: list[dict],
    sampling: Any,
    samples: int,
    fewshot: bool,
    opts: dict,
    cfg: EvalConfig,
    desc: str,
) -> tuple[list[list[Any]], int | None]:
    """Every row's samples through teacher.stream (concurrent for openai:), as [row][sample] Generations."""
    from nestling.distill.prompts import teacher_messages
    from nestling.distill.teachers import Job, default_teacher_threads, load_teacher
    from tqdm.auto import tqdm

    teacher = load_teacher(spec, n_threads=cfg.threads or default_teacher_threads(), **opts)
    jobs = [
        Job(i, teacher_messages(r["question"], fewshot=fewshot), tuple(range(samples)))
        for i, r in enumerate(rows)
    ]
    out: list[list[Any]] = [[None] * samples for _ in rows]
    try:
        with tqdm(total=len(rows) * samples, desc=desc, disable=not cfg.progress, mininterval=1.0) as bar:
            for i, j, g in teacher.stream(jobs, sampling):
                out[i][j] = g
                bar.update(1)
        params = teacher.params
    finally:
        teacher.close()
    return out, params


def teacher_eval(
    run: Path, spec: str, held: list[dict], scorer: TaskScorer, cfg: EvalConfig
) -> dict[str, Any]:
    """Greedy teacher accuracy with the prompt and budget that wrote the traces; cached in
    RUN/teacher_eval.json by spec + questions + prompt + budget (not when a request failed)."""
    from nestling.distill.prompts import prompt_card
    from nestling.distill.teachers import Sampling

    fewshot, max_tokens, opts = _teacher_setup(run, spec, cfg)
    # The prompt's content, not just the fewshot flag: an edited template must not reuse a stale accuracy.
    prompt = prompt_card(fewshot)["sha256"]
    identity = {"teacher": spec, "questions": held, "max_tokens": max_tokens, "prompt": prompt}
    if opts.get("extra"):  # only when set, so caches written before request fields existed stay valid
        identity["extra"] = opts["extra"]
    cache_path = RunDir(run).teacher_eval
    cached = read_cache(cache_path, identity)
    if cached is not None:
        log.info("teacher eval: cached in %s", cache_path)
        return cached
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, seed=0)
    rows, params = run_teacher(spec, held, sampling, 1, fewshot, opts, cfg, "eval teacher")
    gens = [row[0] for row in rows]
    failed = sum(g.error is not None for g in gens)
    # Steps come from the chain and the answer part; the answer only from the answer part, as in traces.
    texts = [f"{g.reasoning or ''}\n{g.text}".strip() for g in gens]
    tokens, seconds = sum(g.tokens for g in gens), sum(g.seconds for g in gens)
    result = {
        "spec": spec,
        "params": params,
        "prompt": {"fewshot": fewshot, "max_tokens": max_tokens},
        "explain": score_outputs(held, texts, scorer, explain=True, answers=[g.text for g in gens]),
        "mean_new_tokens": tokens / len(gens),
        "latency_s": seconds / len(gens),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "truncated": sum(g.truncated for g in gens),
        "failed_requests": failed,
        "chains": sum(g.reasoning is not None for g in gens),
        "samples": [
            {"question": r["question"], "gold": r["gold"], "output": t}
            for r, t in zip(held[:5], texts[:5], strict=True)
        ],
    }
    result["accuracy"] = result["explain"]["accuracy"]
    result["accuracy_ci"] = result["explain"]["accuracy_ci"]
    if failed:
        log.warning("teacher eval: %d of %d requests failed (scored wrong, not cached)", failed, len(gens))
    elif _writable(run):
        write_cache(cache_path, identity, result, stage="eval-teacher")
    return result


def vote_reference(
    run: Path, spec: str, held: list[dict], scorer: TaskScorer, cfg: EvalConfig
) -> tuple[list[dict], dict[str, Any]]:
    """Held-out rows labelled by the teacher's self-consistency vote (no gold answers); rows without a
    majority are left out. Cached in RUN/teacher_vote.json."""
    from nestling.distill.filters import FilterConfig, vote_labels
    from nestling.distill.prompts import prompt_card
    from nestling.distill.teachers import Sampling

    tcfg = traces_config(run)
    fewshot, max_tokens, opts = _teacher_setup(run, spec, cfg)
    samples = max(3, int(tcfg.get("samples") or 4))  # fewer than 3 votes cannot form a majority of 2+
    threshold = float(tcfg.get("vote_threshold") or 0.5)
    sampling = Sampling(
        temperature=float(tcfg.get("temperature") or 0.7),
        top_p=float(tcfg.get("top_p") or 0.95),
        max_tokens=max_tokens,
        seed=int(tcfg.get("seed") or 0) * 1000 + 500,  # not the training samples' seeds
    )
    info = {
        "kind": "teacher-vote",
        "teacher": spec,
        "samples": samples,
        "threshold": threshold,
        "heldout": len(held),
    }
    identity = {**info, "questions": held, "prompt": prompt_card(fewshot)["sha256"], "max_tokens": max_tokens}
    cache_path = RunDir(run).teacher_vote
    labels = read_cache(cache_path, identity, "labels")
    if labels is None:
        gens, _ = run_teacher(spec, held, sampling, samples, fewshot, opts, cfg, "teacher vote")
        records = [
            {"qid": r["id"], "answer": scorer.extract(r, g.text) if g.text.strip() else None}
            for r, row in zip(held, gens, strict=True)
            for g in row
            if g.error is None
        ]
        labels = vote_labels(records, FilterConfig(vote_threshold=threshold))
        if not any(g.error for row in gens for g in row) and _writable(run):
            write_cache(cache_path, identity, labels, "labels", stage="eval-vote")
    labelled = [{**r, "gold": labels[r["id"]]} for r in held if r["id"] in labels]
    info["labelled"] = len(labelled)
    if not labelled:
        raise NestlingError(
            f"{run}: the task has no gold answers and the teacher's {samples} samples never agreed on a "
            "held-out question; evaluate on a task with gold answers or use a stronger teacher"
        )
    return labelled, info


# ---- students ------------------------------------------------------------------------------------------


def generate(
    model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str, bar: bool
):
    """Greedy, left-padded batches; returns (texts, new-token counts, seconds)."""
    import torch
    from tqdm.auto import tqdm

    tok.padding_side = "left"  # generation appends on the right, so padding must sit on the left
    texts, counts = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not bar, mininterval=1.0):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, new)
        for seq in new.tolist():
            n = len(seq)
            if tok.eos_token_id in seq:
                n = seq.index(tok.eos_token_id) + 1  # the eos counts as a generated token
            counts.append(n)
            texts.append(tok.decode(seq[:n], skip_special_tokens=True))
    return texts, counts, time.perf_counter() - t0


def student_eval(
    model_dir: Path, held: list[dict], scorer: TaskScorer, cfg: EvalConfig, name: str
) -> dict[str, Any]:
    """Both modes, batched for accuracy; a few questions one at a time for latency."""
    import torch
    from nestling.distill.students import count_params, load_student

    model, tok = load_student(model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"name": name, "params": count_params(model)}
    samples: dict[str, list[str]] = {}
    for mode in MODES:
        explain = mode == "explain"
        prompts = [student_prompt(r["question"], explain=explain) for r in held]
        budget = cfg.max_new_tokens if explain else 16
        texts, counts, secs = generate(
            model, tok, prompts, budget, cfg.batch_size, f"eval {name} ({mode})", cfg.progress
        )
        m = score_outputs(held, texts, scorer, explain)
        m["mean_new_tokens"] = sum(counts) / len(counts)
        m["truncated"] = sum(c >= budget for c in counts) / len(counts)
        m["batched_tokens_per_s"] = sum(counts) / max(secs, 1e-9)
        result[mode] = m
        samples[mode] = texts
    lat = held[: cfg.latency_samples]
    if lat:
        _, counts, secs = generate(
            model,
            tok,
            [student_prompt(r["question"], explain=True) for r in lat],
            cfg.max_new_tokens,
            1,
            "",
            False,
        )
        result["latency_s"] = secs / len(lat)
        result["tokens_per_s"] = sum(counts) / max(secs, 1e-9)
    result["accuracy"] = result["explain"]["accuracy"]
    result["accuracy_ci"] = result["explain"]["accuracy_ci"]
    result["accuracy_answer"] = result["answer"]["accuracy"]
    result["accuracy_answer_ci"] = result["answer"]["accuracy_ci"]
    result["samples"] = [
        {"question": r["question"], "gold": r["gold"], "answer_mode": a, "explain_mode": e}
        for r, a, e in zip(held[:5], samples["answer"][:5], samples["explain"][:5], strict=False)
    ]
    return result


# ---- the stage -----------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate and write the files; returns {teacher, baseline, students: {name: result}, table}."""
    from nestling.distill.accel import set_threads

    run, rd = Path(cfg.run), RunDir(cfg.run)
    train_rows, held = rd.splits()
    if cfg.limit:
        held = held[: cfg.limit]
    set_threads(cfg.threads)
    scorer = TaskScorer()
    write = _writable(run)
    if not write:
        log.warning("%s: another process is writing this run; evaluating read-only (nothing written)", run)
    teacher_spec = cfg.teacher or default_teacher(run)
    ref: dict[str, Any] = {"kind": "gold", "heldout": len(held)}
    if all(r.get("gold") is None for r in held):
        if teacher_spec == "none":
            raise NestlingError(
                f"{run}: the task has no gold answers, so held-out questions are scored against the "
                "teacher's self-consistency vote; drop --teacher none"
            )
        held, ref = vote_reference(run, teacher_spec, held, scorer, cfg)
        train_rows = _vote_labelled_train(run, train_rows)
    examples = [Example.from_row(r) for r in train_rows], [Example.from_row(r) for r in held]
    base = trivial_baseline(*examples, scorer)
    base["accuracy_ci"] = wilson(round((base.get("accuracy") or 0) * len(held)), len(held))
    teacher = None if teacher_spec == "none" else teacher_eval(run, teacher_spec, held, scorer, cfg)
    context = {"reference": ref, "baseline": base, "teacher": teacher}
    students = {
        name: _eval_student(rd, name, held, scorer, cfg, context if write else None)
        for name in _student_names(rd, cfg.students)
    }
    result = {"stage": "eval", **context, "students": students}
    result["table"] = summary_table(result)
    if write:
        atomic_write_json(rd.eval_file("json"), result)
        atomic_write_text(rd.eval_file("md"), f"# nestling eval: {run}\n\n{result['table']}")
    return result


def _student_names(rd: RunDir, names: list[str] | None) -> list[str]:
    """The students asked for, else every trained one under RUN/students; each must have its model."""
    if names is None:
        names = sorted(p.parent.parent.name for p in rd.students.glob("*/model/config.json"))
    if not names:
        raise NestlingError(f"{rd.students}: no trained students; run `nestling train --run {rd.root}` first")
    for name in names:
        if not (rd.student(name) / "model").is_dir():
            raise NestlingError(
                f"{rd.student(name) / 'model'}: not found; train it first (`nestling train --run {rd.root}`)"
            )
    return names


def _eval_student(
    rd: RunDir, name: str, held: list[dict], scorer: TaskScorer, cfg: EvalConfig, context: dict | None
) -> dict[str, Any]:
    """One student's result, from its cached eval.json when the questions, model files and recipe match;
    written with `context` (reference, baseline, teacher) into eval.{json,md} unless context is None."""
    sdir = rd.student(name)
    model_files = (try_read_manifest(sdir) or {}).get("files", {})
    identity = {"inputs": {"questions": fingerprint(held), "model": model_files}, "config": _eval_recipe(cfg)}
    cached = read_cache(rd.eval_file("json", name), identity)
    if cached is not None:
        log.info("eval %s: up to date", name)
        return cached
    res = student_eval(sdir / "model", held, scorer, cfg, name)
    if context is not None:
        extra = {"format": "nestling/1", "stage": "eval", "config": _eval_recipe(cfg), **context}
        write_cache(rd.eval_file("json", name), identity, res, **extra)
        md = student_md(name, res, context["baseline"], context["teacher"], context["reference"])
        atomic_write_text(rd.eval_file("md", name), md)
    return res


def _writable(run: Path) -> bool:
    """False while another process holds the run's writer lock: eval then reads (and computes) without
    writing, so a finished run can be evaluated beside a running stage."""
    from nestling.core.lock import locked_by_another

    return not locked_by_another(run)


def _vote_labelled_train(run: Path, train_rows: list[dict]) -> list[dict]:
    """Training rows with the traces' vote labels as gold, so the trivial baseline has answers to count."""
    from nestling.distill.train import read_jsonl

    kept = RunDir(run).kept_file
    labels = {r["qid"]: r["answer"] for r in (read_jsonl(kept) if kept.is_file() else [])}
    return [{**r, "gold": labels.get(r["id"], r.get("gold"))} for r in train_rows]


def _eval_recipe(cfg: EvalConfig) -> dict[str, Any]:
    keep = ("limit", "max_new_tokens")
    return {k: v for k, v in asdict(cfg).items() if k in keep}
