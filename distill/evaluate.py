"""Held-out evaluation: the teacher (greedy), the trivial baseline and each student in both modes.

    nestling eval --run runs/x                    # every student under runs/x/students/
    nestling eval --run runs/x --students tiny --limit 50

For each held-out question of RUN/traces/questions.jsonl: the teacher answers greedily with its own prompt
(cached in RUN/teacher_eval.json, keyed by teacher spec + questions, because it is the slow part); each
student answers greedily under the answer prompt and under the explain prompt. Scored by the task's own
verifier (task.extract + task.score, full credit only). Explanations are parsed into steps and checked by
serve.explain, the same checks the runtime shows. Writes RUN/students/<name>/eval.{json,md} and
RUN/eval.{json,md} (the side-by-side table); every eval.json carries "stage": "eval".

The trivial baseline answers every question with the most common gold answer of the training split (per
task): a model that does not beat it has learned nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestling.serve.config import check
from nestling.serve.errors import NestlingError
from nestling.serve.explain import check_steps, explanation_consistent, parse_steps
from nestling.serve.manifest import atomic_write_json, atomic_write_text, fingerprint, try_read_manifest
from nestling.serve.prompting import student_prompt

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


# ---- questions, tasks, baseline ------------------------------------------------------------------------


def load_questions(run: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows with a gold answer) from RUN/traces/questions.jsonl."""
    from nestling.distill.train import read_jsonl

    rows = read_jsonl(run / "traces" / "questions.jsonl")
    train = [r for r in rows if r.get("split") == "train"]
    held = [r for r in rows if r.get("split") == "heldout" and r.get("gold") is not None]
    if not held:
        raise NestlingError(
            f"{run / 'traces' / 'questions.jsonl'}: no held-out questions with a gold answer; re-run traces "
            "with a held-out share (--heldout) on a task that has gold answers"
        )
    return train, held


class Scorer:
    """task.extract + task.score per row, with one Task object per task name (mixes have several)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Any] = {}

    def task(self, name: str) -> Any:
        from nestling.distill.tasks import load_task

        if name not in self._tasks:
            self._tasks[name] = load_task(name)
        return self._tasks[name]

    def extract(self, row: dict, text: str) -> str | None:
        return self.task(row["task"]).extract(text)

    def score(self, row: dict, answer: str | None) -> bool:
        from nestling.distill.tasks import Example

        return bool(self.task(row["task"]).score(answer, Example.from_row(row)))


def baseline(train: list[dict], held: list[dict], scorer: Scorer) -> dict[str, Any]:
    """distill.tasks.trivial_baseline over question rows, scored by each row's task."""
    from nestling.distill.tasks import Example, trivial_baseline

    def score(answer: str | None, ex: Example) -> bool:
        return bool(scorer.task(ex.task).score(answer, ex))

    return trivial_baseline([Example.from_row(r) for r in train], [Example.from_row(r) for r in held], score)


# ---- metrics -------------------------------------------------------------------------------------------


def score_outputs(rows: list[dict], texts: list[str], scorer: Scorer, explain: bool) -> dict[str, Any]:
    """Accuracy (overall and by task); for explanations also step checks and consistency."""
    correct, by_task = [], {}
    all_right, checkable, consistent = 0, 0, 0
    for row, text in zip(rows, texts, strict=True):
        answer = scorer.extract(row, text)
        ok = scorer.score(row, answer)
        correct.append(ok)
        by_task.setdefault(row["task"], []).append(ok)
        if explain:
            steps = parse_steps(text)
            checks = [c.ok for c in check_steps(steps, row["task"])]
            checked = [c for c in checks if c is not None]
            checkable += bool(checked)
            all_right += bool(checked) and all(checked)
            consistent += explanation_consistent(steps, answer)
    n = len(rows)
    out: dict[str, Any] = {
        "accuracy": sum(correct) / n,
        "n": n,
        "by_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
    }
    if explain:
        out["steps_all_right"] = all_right / n  # every checked step right (and at least one checkable)
        out["steps_checkable"] = checkable / n
        out["consistent"] = consistent / n
    return out


# ---- teacher -------------------------------------------------------------------------------------------


def traces_config(run: Path) -> dict[str, Any]:
    """The traces stage's resolved config (teacher, prompt, budget), {} when its manifest is absent."""
    return dict((try_read_manifest(run / "traces") or {}).get("config") or {})


def default_teacher(run: Path) -> str:
    """The teacher that wrote the traces (their manifest records it), else the bundled SmolLM2."""
    return str(traces_config(run).get("teacher") or "gguf:smollm2")


def teacher_eval(run: Path, spec: str, held: list[dict], scorer: Scorer, cfg: EvalConfig) -> dict[str, Any]:
    """Greedy teacher accuracy with the prompt and budget that wrote the traces; cached in
    RUN/teacher_eval.json by spec + questions + prompt + budget."""
    from nestling.distill.prompts import prompt_card, teacher_messages
    from nestling.distill.teachers import Sampling, default_threads, load_teacher

    tcfg = traces_config(run)
    fewshot = bool(tcfg.get("fewshot", True))
    max_tokens = cfg.teacher_max_tokens or int(tcfg.get("max_tokens") or 256)
    # The prompt's content, not just the fewshot flag: an edited template must not reuse a stale accuracy.
    prompt = prompt_card(fewshot)["sha256"]
    key = fingerprint({"teacher": spec, "questions": held, "max_tokens": max_tokens, "prompt": prompt})
    cache_path = run / "teacher_eval.json"
    cached = try_read_json(cache_path)
    if cached and cached.get("key") == key:
        log.info("teacher eval: cached in %s", cache_path)
        return cached["result"]
    from tqdm.auto import tqdm

    teacher = load_teacher(spec, n_threads=cfg.threads or default_threads())
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, seed=0)
    gens = []
    try:
        for row in tqdm(held, desc="eval teacher", disable=not cfg.progress, mininterval=1.0):
            messages = teacher_messages(row["question"], fewshot=fewshot)
            gens.append(teacher.generate([messages], n=1, sampling=sampling)[0][0])
        params = teacher.params
    finally:
        teacher.close()
    texts = [g.text for g in gens]
    tokens, seconds = sum(g.tokens for g in gens), sum(g.seconds for g in gens)
    result = {
        "spec": spec,
        "params": params,
        "prompt": {"fewshot": fewshot, "max_tokens": max_tokens},
        "explain": score_outputs(held, texts, scorer, explain=True),
        "mean_new_tokens": tokens / len(gens),
        "latency_s": seconds / len(gens),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "samples": [
            {"question": r["question"], "gold": r["gold"], "output": t}
            for r, t in zip(held[:5], texts[:5], strict=True)
        ],
    }
    result["accuracy"] = result["explain"]["accuracy"]
    atomic_write_json(cache_path, {"stage": "eval-teacher", "key": key, "result": result})
    return result


def try_read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    model_dir: Path, held: list[dict], scorer: Scorer, cfg: EvalConfig, name: str
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
    result["accuracy_answer"] = result["answer"]["accuracy"]
    result["samples"] = [
        {"question": r["question"], "gold": r["gold"], "answer_mode": a, "explain_mode": e}
        for r, a, e in zip(held[:5], samples["answer"][:5], samples["explain"][:5], strict=False)
    ]
    return result


# ---- the stage -----------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(result: dict[str, Any]) -> str:
    """Markdown: teacher, trivial baseline, each student, side by side."""
    lines = [
        "| model | params | accuracy (explain) | accuracy (answer) | all steps right | consistent | "
        "mean tokens | latency s | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    t = result.get("teacher")
    if t:
        e = t["explain"]
        p = f"{t['params'] / 1e6:.1f}M" if t.get("params") else "-"
        lines.append(
            f"| teacher {t['spec']} (greedy) | {p} | {_pct(e['accuracy'])} | - | "
            f"{_pct(e['steps_all_right'])} | {_pct(e['consistent'])} | {t['mean_new_tokens']:.0f} | "
            f"{t['latency_s']:.2f} | {t['tokens_per_s']:.0f} |"
        )
    b = result["baseline"]
    lines.append(f"| trivial baseline | - | - | {_pct(b['accuracy'])} | - | - | - | - | - |")
    for name, s in result.get("students", {}).items():
        e, a = s["explain"], s["answer"]
        lines.append(
            f"| student {name} | {s['params'] / 1e6:.2f}M | {_pct(e['accuracy'])} | {_pct(a['accuracy'])} | "
            f"{_pct(e['steps_all_right'])} | {_pct(e['consistent'])} | {e['mean_new_tokens']:.0f} | "
            f"{s.get('latency_s', 0):.2f} | {s.get('tokens_per_s', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def _student_md(name: str, s: dict[str, Any], base: dict[str, Any], teacher: dict | None) -> str:
    lines = [f"# eval: student {name}", "", f"Held-out questions: {s['explain']['n']}.", ""]
    lines.append(summary_table({"teacher": teacher, "baseline": base, "students": {name: s}}))
    lines += ["", "## Samples", ""]
    for x in s["samples"]:
        lines += [
            f"- **{x['question']}** (gold {x['gold']})",
            f"  - answer mode: `{x['answer_mode'].strip()}`",
            "  - explain mode: `" + " / ".join(x["explain_mode"].strip().splitlines()) + "`",
        ]
    return "\n".join(lines) + "\n"


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate and write the files; returns {teacher, baseline, students: {name: result}, table}."""
    run = Path(cfg.run)
    train_rows, held = load_questions(run)
    if cfg.limit:
        held = held[: cfg.limit]
    import torch

    if not torch.cuda.is_available():  # same reasoning as distill.train._threads: OpenMP spins under load
        torch.set_num_threads(cfg.threads or max(1, min(2, os.cpu_count() or 1)))
    scorer = Scorer()
    base = baseline(train_rows, held, scorer)
    teacher_spec = cfg.teacher or default_teacher(run)
    teacher = None if teacher_spec == "none" else teacher_eval(run, teacher_spec, held, scorer, cfg)

    names = cfg.students
    if names is None:
        names = sorted(p.parent.parent.name for p in (run / "students").glob("*/model/config.json"))
    if not names:
        raise NestlingError(
            f"{run / 'students'}: no trained students; run `nestling train --run {run}` first"
        )
    students: dict[str, Any] = {}
    for name in names:
        sdir = run / "students" / name
        if not (sdir / "model").is_dir():
            raise NestlingError(f"{sdir / 'model'}: not found; train it first (`nestling train --run {run}`)")
        inputs = {"questions": fingerprint(held), "model": (try_read_manifest(sdir) or {}).get("files", {})}
        key = fingerprint({"inputs": inputs, "config": _eval_recipe(cfg)})
        cached = try_read_json(sdir / "eval.json")
        if cached and cached.get("key") == key:
            log.info("eval %s: up to date", name)
            students[name] = cached["result"]
            continue
        res = student_eval(sdir / "model", held, scorer, cfg, name)
        students[name] = res
        atomic_write_json(
            sdir / "eval.json",
            {
                "format": "nestling/1",
                "stage": "eval",
                "key": key,
                "config": _eval_recipe(cfg),
                "baseline": base,
                "teacher": teacher,
                "result": res,
            },
        )
        atomic_write_text(sdir / "eval.md", _student_md(name, res, base, teacher))
    result = {"stage": "eval", "teacher": teacher, "baseline": base, "students": students}
    result["table"] = summary_table(result)
    atomic_write_json(run / "eval.json", result)
    atomic_write_text(run / "eval.md", f"# nestling eval: {run}\n\n{result['table']}")
    return result


def _eval_recipe(cfg: EvalConfig) -> dict[str, Any]:
    keep = ("limit", "max_new_tokens")
    return {k: v for k, v in asdict(cfg).items() if k in keep}
