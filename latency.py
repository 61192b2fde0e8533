"""Per-answer latency and accuracy: what a user waits for and gets, measured through the runtime a user
deploys (``Reasoner``).

Decode tokens/s says little about a multitask student that answers in 1-3 tokens; this times whole answers
(prompt processing included), one question at a time, in explain and answer-only modes, for every variant of
an export, on the run's held-out questions. Given a scorer, each answer is also scored, so every export's
accuracy is measured on the same questions as its PyTorch student (export-time parity checks only a few).

    lat = measure_export(Path("runs/default/exports/tiny"), questions, n_threads=1, score=score)
    lat["gguf-q4_k_m"]["explain"]["median_s"], lat["gguf-q4_k_m"]["answer"]["accuracy"]
    calc = measure_calculator(Path("runs/default/exports/tiny"), questions, score=score)  # default variant
    calc["accuracy"], calc["complete_share"], calc["corrections_per_answer"]
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nestling.core.manifest import read_cache, read_manifest, write_cache

log = logging.getLogger(__name__)

MODES = {"explain": True, "answer": False}


Score = Callable[[int, str], bool]  # (question index, answer text) -> right


def _time_answers(reasoner: Any, questions: list[str], explain: bool, score: Score | None) -> dict[str, Any]:
    reasoner.ask(questions[0], explain=explain)  # warm-up: first-call allocations are not a user's wait
    seconds, right = [], 0
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        a = reasoner.ask(q, explain=explain)
        seconds.append(time.perf_counter() - t0)
        right += bool(score and score(i, a.text))
    out = {"median_s": statistics.median(seconds), "mean_s": statistics.fmean(seconds), "n": len(seconds)}
    if score:
        out.update(correct=right, accuracy=right / len(questions))
    return out


def measure_variant(
    export_dir: Path, variant: str, questions: list[str], n_threads: int, score: Score | None = None
) -> dict[str, Any]:
    """Median and mean seconds per answer of one variant in both modes (and accuracy, given `score`)."""
    from nestling.serve.runtime import Reasoner

    with Reasoner.load(export_dir, variant=variant, n_threads=n_threads) as r:
        return {mode: _time_answers(r, questions, explain, score) for mode, explain in MODES.items()}


def _identity(manifest: dict[str, Any], questions: list[str], n_threads: int, score: Score | None) -> dict:
    """What a timing pass is computed from, its cache key: the export's files, questions, threads, scoring."""
    files = manifest.get("files")
    return {"files": files, "questions": questions, "threads": n_threads, "scored": bool(score)}


def measure_calculator(
    export_dir: Path,
    questions: list[str],
    n_threads: int = 1,
    cache: Path | None = None,
    score: Score | None = None,
) -> dict[str, Any]:
    """The export's default variant explaining with the calculator in the loop (``Reasoner.ask(calculator=
    True)``): seconds per answer, corrections, the share of complete explanations and (given `score`)
    accuracy; cached in ``cache`` like measure_export."""
    from nestling.serve.runtime import MAX_CORRECTIONS, Reasoner

    manifest = read_manifest(export_dir, stage="export")
    key = {**_identity(manifest, questions, n_threads, score), "max_corrections": MAX_CORRECTIONS}
    cached = read_cache(cache, key, "calculator") if cache else None
    if cached is not None:
        return cached
    log.info("answering %d questions of %s with the calculator", len(questions), export_dir.name)
    with Reasoner.load(export_dir, n_threads=n_threads) as r:
        r.ask(questions[0], calculator=True)  # warm-up, as in _time_answers
        seconds, answers = [], []
        for q in questions:
            t0 = time.perf_counter()
            answers.append(r.ask(q, calculator=True))
            seconds.append(time.perf_counter() - t0)
        out = {"variant": r.variant, **_calculated(answers, seconds, score)}
    if cache:
        write_cache(cache, key, out, "calculator")
    return out


def _calculated(answers: list[Any], seconds: list[float], score: Score | None) -> dict[str, Any]:
    n = len(answers)
    out = {
        "median_s": statistics.median(seconds), "mean_s": statistics.fmean(seconds), "n": n,
        "complete_share": sum(a.complete is True for a in answers) / n,
        "corrections_per_answer": sum(a.corrections for a in answers) / n,
        "answers_corrected": sum(a.corrections > 0 for a in answers),
    }  # fmt: skip
    if score:
        right = sum(bool(score(i, a.text)) for i, a in enumerate(answers))
        out.update(correct=right, accuracy=right / n)
    return out


def measure_export(
    export_dir: Path,
    questions: list[str],
    n_threads: int = 1,
    cache: Path | None = None,
    score: Score | None = None,
) -> dict[str, dict[str, Any]]:
    """Every variant of an export; cached in ``cache`` (keyed by the export's files and the questions)."""
    manifest = read_manifest(export_dir, stage="export")
    key = _identity(manifest, questions, n_threads, score)
    cached = read_cache(cache, key, "variants") if cache else None
    if cached is not None:
        return cached
    out = {}
    for variant in manifest.get("variants", {}):
        log.info(
            "timing (and scoring) %d answers of %s %s in both modes", len(questions), export_dir.name, variant
        )
        out[variant] = measure_variant(export_dir, variant, questions, n_threads, score)
    if cache:
        write_cache(cache, key, out, "variants")
    return out
