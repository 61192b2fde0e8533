"""The traces stage: a teacher writes k rationales per training question; an append-only store keeps them.

    nestling traces --task rg:basic_arithmetic --teacher gguf:smollm2 --samples 4 --n 200 --out runs/x

    run_traces(TracesConfig(out="runs/x"))  # -> runs/x/traces/

Writes RUN/traces/{questions.jsonl, traces.jsonl, kept.jsonl, datacard.json, coverage.png, manifest.json}.
traces.jsonl is append-only: one os.write() of a whole line per record, then fsync. Kill the process at any
moment and re-run the same command: a torn last line is cut off, finished records are kept and skipped, and
the run continues where it stopped. Sample j of every question uses seed ``seed * 1000 + j``.

Requests are pipelined: each sample is stored the moment the teacher returns it, whatever the others are
doing. A request that still fails after the teacher's retries (a hung server, an HTML page, a garbled body)
is counted in the data card and not stored, so the next run of the same command asks for it again; the
stage is only marked complete once every sample is stored. A reasoning teacher's chain is stored apart from
its answer (``chain``, ``chain_source``), and kept rows carry both rationale styles (distill.filters).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nestling.distill.filters import GROUNDING, RATIONALE_STYLES, FilterConfig, filter_traces
from nestling.distill.prompts import prompt_card, prompt_hash, teacher_messages
from nestling.distill.tasks import DEFAULT_TASK, Example, Task, load_task, split_examples, trivial_baseline
from nestling.distill.teachers import (
    DEFAULT_TEACHER,
    Job,
    Sampling,
    default_max_tokens,
    load_teacher,
    teacher_options,
)

from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.manifest import (
    atomic_write_json,
    fingerprint,
    is_fresh,
    read_jsonl,
    try_read_manifest,
    write_jsonl,
    write_manifest,
)
from nestling.core.rundir import RunDir

log = logging.getLogger(__name__)

STAGE = "traces"
FILES = ["questions.jsonl", "traces.jsonl", "kept.jsonl", "datacard.json", "coverage.png"]


@dataclass
class TracesConfig:
    task: str = field(
        default=DEFAULT_TASK, metadata={"help": "task spec: rg:NAME?k=v, mix:A,B, file:PATH, hf:NAME"}
    )
    teacher: str = field(
        default=DEFAULT_TEACHER,
        metadata={"help": "teacher spec: gguf:smollm2, gguf:PATH, openai:MODEL@URL, hf:PATH"},
    )
    samples: int = field(
        default=4,
        metadata={"help": "rationales per training question (k); with --adaptive, see --max-samples"},
    )
    # Adaptive sampling harvests the teacher's pass@k: sample j of a question has the same seed either way, so
    # an adaptive run's records are the first samples of the flat run's, and its coverage after j samples per
    # question is the flat run's exactly; only the samples after a question is solved are saved.
    adaptive: bool = field(
        default=False,
        metadata={
            "help": "sample in rounds: each round gives one more rationale to every question still short of "
            "--stop-after verified ones, until --max-samples each or a --budget-* total is reached"
        },
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "adaptive: most rationales per question (default: 2 x --samples)"}
    )
    stop_after: int = field(
        default=1,
        metadata={"help": "adaptive: a question stops once it has this many distinct verified rationales"},
    )
    budget_tokens: int | None = field(
        default=None, metadata={"help": "adaptive: stop once the teacher has written this many tokens in all"}
    )
    budget_seconds: float | None = field(
        default=None,
        metadata={
            "help": "adaptive: stop once the teacher has spent this many seconds in all (the seconds the "
            "records carry, summed: request time, so concurrent requests each count)"
        },
    )
    # 400 questions -> 200 train x 4 samples = 800 rationales of ~19 tokens (about 4.5 min on 2 free cores)
    # and 200 held-out: a 95% interval of about +-6 points instead of +-13 with 40, so two models 5 points
    # apart can be told apart. The default task has only 563 distinct questions.
    n: int = field(default=400, metadata={"help": "questions to draw (train + held-out)"})
    heldout: float | None = field(
        default=None,
        metadata={
            "help": "held-out questions: a fraction < 1 or a count >= 1 (default: half of --n, at most 200; "
            "a count is capped at half the questions when the task has fewer than --n)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for drawing, splitting and sampling"})
    out: str = field(default="runs/default", metadata={"help": "run directory; traces go to RUN/traces"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "generated tokens per rationale (default: by teacher kind: 64 for gguf:smollm2, 2048 for "
            "other gguf: and hf:, 4096 for openai: reasoning servers)"
        },
    )
    fewshot: bool = field(default=True, metadata={"help": "show worked examples in the prompt"})
    calculator: bool = field(
        default=False,
        metadata={
            "help": "gguf teachers: write with the calculator in the loop, a finished line's false result "
            "replaced by the true value before the teacher goes on (records count the corrections)"
        },
    )
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads for the teacher (default: half the cores)"}
    )
    batch: int | None = field(
        default=None, metadata={"help": "questions per teacher call (default: the backend's)"}
    )
    concurrency: int | None = field(
        default=None,
        metadata={"help": "openai: requests in flight (default: NESTLING_TEACHER_CONCURRENCY, else 8)"},
    )
    timeout: float = field(default=600.0, metadata={"help": "openai: seconds to wait for one reply"})
    retries: int = field(
        default=2, metadata={"help": "openai: retries per request (the SDK's backoff, Retry-After honoured)"}
    )
    request_extra: str | None = field(
        default=None,
        metadata={
            "help": "openai: JSON object merged into every request body, e.g. "
            '\'{"chat_template_kwargs": {"enable_thinking": true}, "reasoning_effort": "low"}\''
        },
    )
    rationale_style: str = field(
        default="full",
        metadata={
            "help": "what kept rows train on when the teacher wrote a chain: full (the whole chain) or short "
            "(its steps with checkable claims plus the conclusion); both are stored",
            "choices": RATIONALE_STYLES,
        },
    )
    vote_threshold: float = field(
        default=0.5,
        metadata={"help": "no-gold questions: majority share needed for a self-consistency label"},
    )
    check_steps: bool = field(default=True, metadata={"help": "drop rationales with a false step"})
    grounding: str = field(
        default="grounded",
        metadata={
            "help": "grounded: keep only chains whose every step is grounded in the question and whose "
            "answer the steps derive (arithmetic and word problems); checked: drop only false steps",
            "choices": GROUNDING,
        },
    )
    max_steps: int = field(default=12, metadata={"help": "drop rationales with more steps than this"})

    def __post_init__(self) -> None:
        check(
            self.task.startswith(("rg:", "mix:", "file:", "hf:")),
            f"--task {self.task!r}: use rg:NAME, mix:A,B, file:PATH or hf:NAME",
        )
        check(
            self.teacher.startswith(("gguf:", "openai:", "hf:")),
            f"--teacher {self.teacher!r}: use gguf:smollm2, gguf:PATH, openai:MODEL@URL or hf:PATH",
        )
        check(self.samples >= 1, f"--samples {self.samples}: must be >= 1, e.g. 4")
        self._check_adaptive()
        check(self.n >= 1, f"--n {self.n}: must be >= 1, e.g. 300")
        if self.heldout is None:
            self.heldout = min(200, self.n // 2)
        check(self.heldout >= 0, f"--heldout {self.heldout}: must be >= 0 (a fraction < 1 or a count)")
        check(
            self.heldout < 1 or self.heldout == int(self.heldout),
            f"--heldout {self.heldout}: a count must be whole",
        )
        check(self.heldout < self.n, f"--heldout {self.heldout}: must be smaller than --n {self.n}")
        check(self.temperature >= 0, f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_tokens is None:
            self.max_tokens = default_max_tokens(self.teacher)
        check(self.max_tokens >= 1, f"--max-tokens {self.max_tokens}: must be >= 1, e.g. 64")
        check(
            self.concurrency is None or self.concurrency >= 1,
            f"--concurrency {self.concurrency}: must be >= 1",
        )
        check(self.timeout > 0, f"--timeout {self.timeout}: must be > 0 seconds")
        check(self.retries >= 0, f"--retries {self.retries}: must be >= 0")
        check(
            self.rationale_style in RATIONALE_STYLES,
            f"--rationale-style {self.rationale_style!r}: use one of {', '.join(RATIONALE_STYLES)}",
        )
        self.request_fields()  # validates the JSON
        check(
            not self.calculator or self.teacher.startswith("gguf:"),
            f"--calculator: only gguf: teachers (the teacher's own text is continued after each correction, "
            f"which a chat API cannot do), not {self.teacher!r}",
        )
        check(self.threads is None or self.threads >= 1, f"--threads {self.threads}: must be >= 1")
        check(self.batch is None or self.batch >= 1, f"--batch {self.batch}: must be >= 1")
        check(bool(self.out), "--out: pass a run directory, e.g. runs/x")
        self.filters()  # validates the filter fields

    def _check_adaptive(self) -> None:
        if self.max_samples is None and self.adaptive:
            self.max_samples = 2 * self.samples
        check(
            self.max_samples is None or self.max_samples >= 1,
            f"--max-samples {self.max_samples}: must be >= 1, e.g. 8",
        )
        check(self.stop_after >= 1, f"--stop-after {self.stop_after}: must be >= 1, e.g. 1")
        for name in ("budget_tokens", "budget_seconds"):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            check(value is None or value > 0, f"{flag} {value}: must be > 0")
        extra = [
            f"--{name.replace('_', '-')}"
            for name in ("max_samples", "budget_tokens", "budget_seconds")
            if getattr(self, name) is not None
        ]
        check(
            self.adaptive or not extra,
            f"{', '.join(extra)}: only with --adaptive (flat sampling draws --samples)",
        )

    def per_question(self) -> int:
        """The most samples a question gets: --samples when flat, --max-samples when adaptive."""
        return int(self.max_samples) if self.adaptive and self.max_samples else self.samples

    def filters(self) -> FilterConfig:
        return FilterConfig(
            vote_threshold=self.vote_threshold,
            check_steps=self.check_steps,
            grounding=self.grounding,
            max_steps=self.max_steps,
            style=self.rationale_style,
        )

    def sampling(self) -> Sampling:
        assert self.max_tokens is not None  # resolved in __post_init__
        return Sampling(self.temperature, self.top_p, self.max_tokens, seed=self.seed * 1000)

    def request_fields(self) -> dict[str, Any]:
        """--request-extra as a dict ({} when unset); a bad value is a one-line error."""
        if not self.request_extra:
            return {}
        try:
            extra = json.loads(self.request_extra)
        except json.JSONDecodeError as e:
            raise NestlingError(
                f"--request-extra: not JSON ({e.msg}); pass an object such as '{{\"k\": 1}}'"
            ) from None
        check(isinstance(extra, dict), f"--request-extra {self.request_extra!r}: must be a JSON object")
        check(
            self.teacher.startswith("openai:"),
            f"--request-extra: only openai: teachers take request fields, not {self.teacher!r}",
        )
        return extra

    def teacher_options(self) -> dict[str, Any]:
        """load_teacher options for this config's teacher (speed knobs, context, extra request fields)."""
        opts = teacher_options(
            self.teacher,
            self.sampling().max_tokens,
            concurrency=self.concurrency,
            timeout=self.timeout,
            retries=self.retries,
            extra=self.request_fields() or None,
        )
        return {**opts, "calculator": True} if self.calculator else opts

    def identity(self) -> dict[str, Any]:
        """The fields that decide the stage's output (threads, batch and request knobs only change speed)."""
        d = asdict(self)
        for speed_only in ("threads", "batch", "concurrency", "timeout", "retries"):
            d.pop(speed_only)
        # Left out at their defaults, so a run written before these fields existed is still fresh.
        if d["request_extra"] is None:
            d.pop("request_extra")
        if d["rationale_style"] == "full":
            d.pop("rationale_style")
        if not d["calculator"]:
            d.pop("calculator")
        if not self.adaptive:
            for adaptive_only in ("adaptive", "max_samples", "stop_after", "budget_tokens", "budget_seconds"):
                d.pop(adaptive_only)
        return d


class TraceStore:
    """Append-only JSONL of records with unique ``id``: one write() per whole line, fsync after each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.repaired_bytes = 0
        self.records: list[dict] = self._load()
        self.ids = {r["id"] for r in self.records}

    def _load(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                # A record is written by one write(); anything after the last newline is a torn tail.
                cut = data.rfind(b"\n") + 1
                self.repaired_bytes = len(data) - cut
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
                data = data[:cut]
                log.warning("%s: dropped a torn last line (%d bytes)", self.path, self.repaired_bytes)
        records, seen = [], set()
        for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rid = rec["id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise NestlingError(
                    f"{self.path}: line {i} is not a trace record; remove that line or use a new --out"
                ) from None
            if rid not in seen:  # a duplicate can only come from a hand edit; keep the first
                seen.add(rid)
                records.append(rec)
        return records

    def append(self, record: dict) -> bool:
        """Write one record durably; False (nothing written) if its id is already stored."""
        return self.append_many([record]) == 1

    def append_many(self, records: list[dict]) -> int:
        """Write records whose ids are new with one write() and one fsync (a group commit: fsync costs ~3 ms
        here, which capped a 64-request teacher at ~290 records/s); returns how many were new."""
        new, ids = [], set()
        for r in records:
            if r["id"] not in self.ids and r["id"] not in ids:
                new.append(r)
                ids.add(r["id"])
        if not new:
            return 0
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):  # short writes are rare on regular files but legal
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records += new
        self.ids |= ids
        return len(new)


def _read_jsonl(path: Path) -> list[dict]:
    return read_jsonl(path, fix="delete the file to redraw the questions")


def _heldout(cfg: TracesConfig, drawn: int) -> float:
    """The held-out fraction, or a count that leaves questions to train on: at most all but one, and at most
    half of a task that has fewer questions than --n."""
    if cfg.heldout < 1:
        return cfg.heldout
    cap = drawn - 1 if drawn >= cfg.n else min(drawn - 1, max(1, drawn // 2))
    if cfg.heldout > cap and drawn < cfg.n:
        log.warning("task %s: held-out capped at %d of %d questions", cfg.task, cap, drawn)
    return min(int(cfg.heldout), cap)


def _questions(task: Task, cfg: TracesConfig, out_dir: Path) -> tuple[list[Example], list[Example], dict]:
    """Draw and split the questions; an existing questions.jsonl must be the same draw (same config)."""
    examples = task.examples(cfg.n, cfg.seed)
    if not examples:
        raise NestlingError(f"task {cfg.task!r}: no questions drawn; check the task spec")
    if len(examples) < cfg.n:
        log.warning("task %s: %d distinct questions available (asked for %d)", cfg.task, len(examples), cfg.n)
    train, held = split_examples(examples, _heldout(cfg, len(examples)), cfg.seed)
    held_ids = {ex.id for ex in held}
    rows = [{**ex.to_row(), "split": "heldout" if ex.id in held_ids else "train"} for ex in examples]
    path = out_dir / "questions.jsonl"
    if path.exists():
        old = _read_jsonl(path)
        key = lambda rs: [(r.get("id"), r.get("question"), r.get("gold"), r.get("split")) for r in rs]  # noqa: E731
        if key(old) != key(rows):
            raise NestlingError(
                f"{path}: drawn with another task, n, heldout or seed; use a new --out or the same settings"
            )
    else:
        write_jsonl(path, rows)
    return train, held, task.stats()


def _check_compatible(store: TraceStore, cfg: TracesConfig, sampling: dict) -> None:
    for r in store.records[:1] + store.records[-1:]:
        if r.get("teacher") != cfg.teacher or r.get("sampling") != sampling:
            raise NestlingError(
                f"{store.path}: written with teacher {r.get('teacher')!r} and sampling {r.get('sampling')}; "
                "re-run with the same settings or use a new --out"
            )
        if r.get("prompt_hash") != prompt_hash(teacher_messages(r["question"], cfg.fewshot)):
            raise NestlingError(
                f"{store.path}: written with another teacher prompt (--fewshot or the template changed); "
                "re-run with the same settings or use a new --out"
            )


def run_traces(cfg: TracesConfig, progress: bool = True) -> Path:
    """Generate (or resume) the traces stage in cfg.out/traces and return that directory."""
    out_dir = RunDir(cfg.out).traces
    inputs = {"task": cfg.task, "teacher": cfg.teacher}
    if is_fresh(out_dir, STAGE, cfg.identity(), inputs) and not _missing_samples(out_dir):
        log.info("%s is complete for this config; skipping", out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(cfg.task)  # once: an hf: task loads its whole dataset
    train, held, task_stats = _questions(task, cfg, out_dir)
    sampling = cfg.sampling()
    sampling_rec = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if cfg.request_fields():  # only when set: stores written before the field existed stay compatible
        sampling_rec["request_extra"] = cfg.request_fields()
    store = TraceStore(out_dir / "traces.jsonl")
    _check_compatible(store, cfg, sampling_rec)
    writer = _Writer(cfg, task, store, sampling, sampling_rec, progress)
    t0 = time.perf_counter()
    try:
        if cfg.adaptive:
            missing, adaptive = _adaptive(cfg, train, writer)
        else:
            wanted = {ex.id: _wanted(ex, store, range(cfg.samples)) for ex in train}
            writer.write(train, {k: v for k, v in wanted.items() if v}, len(train))
            missing, adaptive = None, None
    finally:
        writer.close()
    wall = time.perf_counter() - t0
    train_ids = {ex.id for ex in train}
    records = [r for r in store.records if r["qid"] in train_ids and int(r["sample"]) < cfg.per_question()]
    if missing is None:
        missing = len(train) * cfg.samples - len(records)
    kept, fstats = filter_traces(records, train, cfg.filters())
    write_jsonl(out_dir / "kept.jsonl", kept)
    baseline = trivial_baseline(train, held, task.score)
    card = datacard(cfg, train, held, task_stats, records, fstats, wall, store.repaired_bytes, baseline)
    card["sampling_cost"] = sampling_cost(records, train, cfg)
    card["coverage_by_task"] = coverage_by_task(kept, train)
    if adaptive is not None:
        card["adaptive"] = adaptive
    errors = writer.errors
    card["teacher_errors"] = {"failed_requests_last_run": dict(errors), "samples_missing": missing}
    card["grounding"] = grounding_effect(records, train, cfg.filters(), fstats)
    atomic_write_json(out_dir / "datacard.json", card)
    plot_coverage(card["sampling_cost"], out_dir / "coverage.png")
    metrics = {k: card[k] for k in ("records", "kept", "coverage", "sample_accuracy", "rationales_per_s")}
    write_manifest(
        out_dir,
        stage=STAGE,
        config=cfg.identity(),
        inputs=inputs,
        files=FILES,
        metrics={**metrics, "samples_missing": missing},
    )
    if missing:
        log.warning(
            "traces: %d samples missing after failed requests (%s); the stage is usable, and re-running the "
            "same command asks the teacher for them again",
            missing,
            ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none failed this run",
        )
    return out_dir


def _wanted(ex: Example, store: TraceStore, indices: Iterable[int]) -> tuple[int, ...]:
    return tuple(j for j in indices if f"{ex.id}:{j}" not in store.ids)


def grounding_effect(
    records: list[dict], train: list[Example], fcfg: FilterConfig, fstats: dict[str, Any]
) -> dict[str, Any]:
    """What the grounding filter costs: rows and coverage kept, against the arithmetic-only filter."""
    out: dict[str, Any] = {
        "mode": fstats.get("grounding", fcfg.grounding),
        "kept": fstats["kept"],
        "coverage": fstats["coverage"],
        "dropped_ungrounded": fstats.get("right_answer_ungrounded_steps", 0),
    }
    if fcfg.check_steps and fcfg.grounding == "grounded":
        _, checked = filter_traces(records, train, replace(fcfg, grounding="checked"))
        out["checked_only"] = {"kept": checked["kept"], "coverage": checked["coverage"]}
    return out


def _missing_samples(out_dir: Path) -> int:
    """Samples a previous run could not get from the teacher: such a stage is written but not complete."""
    m = try_read_manifest(out_dir, STAGE) or {}
    return int((m.get("metrics") or {}).get("samples_missing") or 0)


def _adaptive(cfg: TracesConfig, train: list[Example], writer: _Writer) -> tuple[int, dict[str, Any]]:
    """Rounds over the open questions (fewer than --stop-after distinct verified rationales, fewer than
    --max-samples drawn): each round, the open questions with the fewest samples get their lowest missing
    index. Everything is derived from the store, so a killed run re-run with the same command continues the
    same sequence; a failed request's index is simply asked for again. Returns (questions left waiting on
    failed requests, the card's "adaptive" section)."""
    store, cap = writer.store, cfg.per_question()
    by_id = {ex.id: ex for ex in train}
    drawn: dict[str, set[int]] = {ex.id: set() for ex in train}
    spent = {"tokens": 0, "seconds": 0.0}
    for r in store.records:
        if r["qid"] in drawn and int(r["sample"]) < cap:
            drawn[r["qid"]].add(int(r["sample"]))
            spent["tokens"] += int(r.get("tokens") or 0)
            spent["seconds"] += float(r.get("seconds") or 0)
    solved = _verified_counts(cfg, train, store.records, cap)
    rounds, stopped_by = 0, "done"

    def over_budget() -> str | None:
        if cfg.budget_tokens is not None and spent["tokens"] >= cfg.budget_tokens:
            return "budget_tokens"
        if cfg.budget_seconds is not None and spent["seconds"] >= cfg.budget_seconds:
            return "budget_seconds"
        return None

    def count(rec: dict) -> None:
        drawn[rec["qid"]].add(int(rec["sample"]))
        spent["tokens"] += int(rec.get("tokens") or 0)
        spent["seconds"] += float(rec.get("seconds") or 0)

    while True:
        open_q = [q for q in drawn if solved.get(q, 0) < cfg.stop_after and len(drawn[q]) < cap]
        if not open_q or (stopped_by := over_budget() or "done") != "done":
            break
        low = min(len(drawn[q]) for q in open_q)
        wanted = {q: (min(set(range(cap)) - drawn[q]),) for q in open_q if len(drawn[q]) == low}
        rounds += 1
        new = writer.write(
            [by_id[q] for q in wanted],
            wanted,
            len(train),
            f"round {rounds}",
            on_record=count,
            stop=over_budget,
        )
        if not new:  # every request of the round failed: leave them to the next run of the command
            stopped_by = "failures"
            break
        touched = {r["qid"] for r in new}
        recs = [r for r in store.records if r["qid"] in touched]
        solved.update(_verified_counts(cfg, [by_id[q] for q in touched], recs, cap))
    never = [q for q in drawn if not solved.get(q) and len(drawn[q]) >= cap]
    waiting = [q for q in drawn if solved.get(q, 0) < cfg.stop_after and len(drawn[q]) < cap]
    section = {
        "max_samples": cap,
        "stop_after": cfg.stop_after,
        "budget_tokens": cfg.budget_tokens,
        "budget_seconds": cfg.budget_seconds,
        "rounds_last_run": rounds,
        "stopped_by": stopped_by,
        "questions_solved": sum(1 for q in drawn if solved.get(q, 0) >= cfg.stop_after),
        "questions_never_solved": len(never),
        "questions_unfinished": len(waiting),
        "samples_drawn": dict(sorted(Counter(len(v) for v in drawn.values()).items())),
        "teacher_tokens": spent["tokens"],
        "teacher_seconds": round(spent["seconds"], 2),
    }
    if never:
        log.info("traces: %d of %d questions never solved in %d samples", len(never), len(train), cap)
    return (len(waiting) if stopped_by == "failures" else 0), section


def _verified_counts(
    cfg: TracesConfig, examples: list[Example], records: list[dict], cap: int
) -> dict[str, int]:
    """qid -> distinct verified rationales among its first `cap` samples (the filters' kept rows)."""
    ids = {ex.id for ex in examples}
    recs = [r for r in records if r["qid"] in ids and int(r["sample"]) < cap]
    kept, _ = filter_traces(recs, examples, cfg.filters())
    return dict(Counter(row["qid"] for row in kept))


class _Writer:
    """The teacher, loaded on first use and kept across rounds, and the store its samples go into."""

    def __init__(
        self,
        cfg: TracesConfig,
        task: Any,
        store: TraceStore,
        sampling: Sampling,
        sampling_rec: dict,
        progress: bool,
    ):
        self.cfg, self.task, self.store = cfg, task, store
        self.sampling, self.sampling_rec, self.progress = sampling, sampling_rec, progress
        self.teacher: Any = None
        self.errors: Counter[str] = Counter()

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
            self.teacher = None

    def write(
        self,
        todo: list[Example],
        wanted: dict[str, tuple[int, ...]],
        n_train: int,
        label: str = "",
        on_record: Callable[[dict], None] | None = None,
        stop: Callable[[], str | None] | None = None,
    ) -> list[dict]:
        """Ask the teacher for wanted[qid] of every question in todo, storing each sample as it arrives;
        `stop` ends the requests early (a spent budget). Returns the new records."""
        todo = [ex for ex in todo if wanted.get(ex.id)]
        if not todo:
            return []
        from rich.progress import Progress

        cfg = self.cfg
        if self.teacher is None:
            self.teacher = load_teacher(cfg.teacher, n_threads=cfg.threads, **cfg.teacher_options())
            if cfg.batch:
                self.teacher.batch = cfg.batch
        by_id = {ex.id: ex for ex in todo}
        jobs = [Job(ex.id, teacher_messages(ex.question, cfg.fewshot), wanted[ex.id]) for ex in todo]
        need = sum(len(job.samples) for job in jobs)
        done, right, failed, added = 0, 0, 0, []
        t0 = time.perf_counter()
        log.info(
            "teacher %s: %d rationales to write for %d of %d training questions%s",
            cfg.teacher,
            need,
            len(todo),
            n_train,
            f" ({label})" if label else "",
        )
        hashes = {job.key: prompt_hash(job.messages) for job in jobs}
        with Progress(*_progress_columns(label), disable=not self.progress, transient=False) as bar:
            tid = bar.add_task("traces", total=need, rate=0.0, yield_=0.0, failed=0)
            for group in self.teacher.stream_batches(jobs, self.sampling):
                recs = self._records(group, by_id, hashes)
                failed += len(group) - len(recs)
                fresh = [r for r in recs if r["id"] not in self.store.ids]
                done += self.store.append_many(fresh)
                added += fresh
                for r in fresh:
                    if on_record:
                        on_record(r)
                right += sum(bool(r["correct"]) for r in fresh)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.update(
                    tid,
                    completed=done + failed,
                    rate=done / elapsed,
                    yield_=right / max(done, 1),
                    failed=failed,
                )
                if stop and stop():
                    break
        return added

    def _records(self, group: list, by_id: dict[str, Example], hashes: dict[str, str]) -> list[dict]:
        """The group's answers as trace records; a failed request is counted by its kind and left out."""
        recs = []
        for qid, j, g in group:
            if g.error:
                self.errors[g.error.partition(":")[0]] += 1
                log.debug("teacher request for %s:%d failed: %s", qid, j, g.error)
                continue
            rec = trace_record(
                self.cfg, self.task, by_id[qid], j, g, self.sampling, self.sampling_rec, hashes[qid]
            )
            recs.append(rec)
        return recs


def _progress_columns(label: str) -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return [
        TextColumn(f"[bold]traces {label}".rstrip()),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "{task.fields[rate]:.1f} rationales/s  right {task.fields[yield_]:.0%}  "
            "failed {task.fields[failed]}"
        ),
        TimeRemainingColumn(),
    ]


def trace_record(
    cfg: TracesConfig,
    task: Any,
    ex: Example,
    j: int,
    g: Any,
    sampling: Sampling,
    sampling_rec: dict,
    phash: str,
) -> dict[str, Any]:
    """One traces.jsonl record. The answer comes from the answer part only: a chain that never reached a
    final answer (cut off, or a <think> never closed) has none, and the filters count it as such."""
    answer = task.extract(g.text) if g.text.strip() else None
    return {
        "id": f"{ex.id}:{j}",
        "qid": ex.id,
        "sample": j,
        "task": ex.task,
        "question": ex.question,
        "gold": ex.gold,
        "teacher": cfg.teacher,
        "sampling": sampling_rec,
        "seed": sampling.seed + j,
        "prompt_hash": phash,
        "rationale": g.text,
        "chain": g.reasoning,
        "chain_source": g.reasoning_source,
        "answer": answer,
        "correct": task.score(answer, ex) if ex.gold is not None else None,
        "tokens": g.tokens,
        "seconds": round(g.seconds, 4),
        "truncated": g.truncated,
        "unclosed_think": g.unclosed_think,
        **({"corrections": g.corrections} if cfg.calculator else {}),
    }


def datacard(
    cfg: TracesConfig,
    train: list[Example],
    held: list[Example],
    task_stats: dict[str, int],
    records: list[dict],
    fstats: dict[str, Any],
    wall: float,
    repaired_bytes: int,
    baseline: dict[str, Any],
) -> dict[str, Any]:
    """Counts, yields, teacher, prompt, sampling and time, as datacard.json records them."""
    graded = [r for r in records if r.get("correct") is not None]
    by_q: dict[str, list[dict]] = {}
    for r in graded:
        by_q.setdefault(r["qid"], []).append(r)
    teacher_s = sum(float(r.get("seconds") or 0) for r in records)
    tokens = sum(int(r.get("tokens") or 0) for r in records)
    sampling = cfg.sampling()
    return {
        "stage": STAGE,
        "task": cfg.task,
        "task_stats": task_stats,
        "questions": {
            "requested": cfg.n,
            "drawn": len(train) + len(held),
            "train": len(train),
            "heldout": len(held),
        },
        "teacher": {"spec": cfg.teacher, "params": _teacher_params(cfg.teacher)},
        "prompt": prompt_card(cfg.fewshot),
        "sampling": {
            **asdict(sampling),
            "samples_per_question": cfg.samples,
            "adaptive": cfg.adaptive,
            "max_samples_per_question": cfg.per_question(),
        },
        "records": len(records),
        "answered": sum(r.get("answer") is not None for r in records),
        "answer_line": round(
            sum("answer:" in (r.get("rationale") or "").lower() for r in records) / len(records), 4
        )
        if records
        else 0.0,
        "sample_accuracy": round(sum(bool(r["correct"]) for r in graded) / len(graded), 4)
        if graded
        else None,
        "questions_any_correct": round(
            sum(any(r["correct"] for r in rs) for rs in by_q.values()) / len(train), 4
        )
        if train
        else 0.0,
        "trivial_baseline": baseline,
        "chains": chain_counts(records),
        "truncated": sum(bool(r.get("truncated")) for r in records),
        "no_final_answer": sum(r.get("answer") is None for r in records),
        "unclosed_think": sum(bool(r.get("unclosed_think")) for r in records),
        "mean_tokens": round(tokens / len(records), 1) if records else None,
        "rationale_style": cfg.rationale_style,
        "styles": fstats["styles"],
        "filters": fstats["filters"],
        "right_answer_wrong_steps": fstats["right_answer_wrong_steps"],
        "right_answer_inconsistent_steps": fstats["right_answer_inconsistent_steps"],
        "right_answer_ungrounded_steps": fstats.get("right_answer_ungrounded_steps", 0),
        "vote": fstats["vote"],
        "kept": fstats["kept"],
        "yield": fstats["yield"],
        "questions_covered": fstats["questions_covered"],
        "coverage": fstats["coverage"],
        "time": {
            "teacher_seconds": round(teacher_s, 2),
            "generation_wall_seconds_last_run": round(wall, 2),
            "tokens": tokens,
        },
        "tokens_per_s": round(tokens / teacher_s, 1) if teacher_s else None,
        "rationales_per_s": round(len(records) / teacher_s, 3) if teacher_s else None,
        "torn_bytes_repaired": repaired_bytes,
        "calculator": calculator_counts(records) if cfg.calculator else None,
        "config_fingerprint": fingerprint(cfg.identity()),
    }


def calculator_counts(records: list[dict]) -> dict[str, int]:
    """How much of the teacher's text the calculator wrote: false results replaced, and in how many
    rationales (all, and those with the right answer)."""
    fixed = [r for r in records if r.get("corrections")]
    return {
        "corrections": sum(int(r["corrections"]) for r in fixed),
        "rationales_corrected": len(fixed),
        "right_answer_corrected": sum(bool(r.get("correct")) for r in fixed),
    }


def sampling_cost(records: list[dict], train: list[Example], cfg: TracesConfig) -> dict[str, Any]:
    """Coverage after j = 1..K samples per question and the samples and teacher tokens it took, flat (every
    question gets j samples) against adaptive (a question stops at its --stop-after-th distinct verified
    rationale), both read off the same records: sample j has the same seed either way. Tokens of samples a
    run did not draw (an adaptive run's solved questions) are estimated at the question's mean and counted in
    ``flat.tokens_estimated_samples``; a point is ``exact`` when every question still unsolved at j has j
    samples drawn (an adaptive run stopped by its budget has not). ``flat_same_coverage`` is the smallest flat
    k that reaches the adaptive run's coverage and its tokens. Exact for tasks with gold answers (a vote
    label can shift with more samples)."""
    k = cfg.per_question()
    recs = sorted(records, key=lambda r: (r["qid"], int(r["sample"])))
    kept, _ = filter_traces(recs, train, cfg.filters())
    kept_at: dict[str, list[int]] = {}
    for row in kept:
        kept_at.setdefault(row["qid"], []).append(int(row["trace"].rpartition(":")[2]))
    tokens: dict[str, dict[int, int]] = {ex.id: {} for ex in train}
    for r in recs:
        tokens[r["qid"]][int(r["sample"])] = int(r.get("tokens") or 0)
    curve = [_cost_point(j, tokens, kept_at, cfg.stop_after, len(train)) for j in range(1, k + 1)]
    last = curve[-1]
    same = next(p for p in curve if p["coverage"] >= last["coverage"])
    return {
        "samples_per_question_max": k,
        "stop_after": cfg.stop_after,
        "curve": curve,
        "flat": {
            "k": k,
            "coverage": last["coverage"],
            "tokens": last["tokens_flat"],
            "tokens_estimated_samples": last["estimated_samples"],
        },
        "adaptive": {
            "coverage": last["coverage"],
            "tokens": last["tokens_adaptive"],
            "samples": last["samples_adaptive"],
        },
        "flat_same_coverage": {
            "k": same["samples_per_question"],
            "tokens": same["tokens_flat"],
            "adaptive_token_share": _share(last["tokens_adaptive"], same["tokens_flat"]),
        },
        "tokens_saved": last["tokens_flat"] - last["tokens_adaptive"],
        "adaptive_token_share": _share(last["tokens_adaptive"], last["tokens_flat"]),
    }


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _cost_point(
    j: int, tokens: dict[str, dict[int, int]], kept_at: dict[str, list[int]], stop_after: int, n_train: int
) -> dict[str, Any]:
    """One point of the sampling-cost curve: after j samples per question (samples 0..j-1)."""
    everything = [t for per_q in tokens.values() for t in per_q.values()]
    overall = sum(everything) / len(everything) if everything else 0.0
    covered, flat, adaptive, samples, estimated, exact = 0, 0.0, 0, 0, 0, True
    for qid, per_q in tokens.items():
        hits = sorted(kept_at.get(qid, []))
        solved_by_j = bool(hits) and hits[0] < j
        covered += solved_by_j
        stop = hits[stop_after - 1] if len(hits) >= stop_after else None
        mean = sum(per_q.values()) / len(per_q) if per_q else overall
        drawn = [i for i in per_q if i < j]
        exact &= solved_by_j or len(drawn) == j
        estimated += j - len(drawn)
        flat += sum(per_q[i] for i in drawn) + mean * (j - len(drawn))
        adaptive += sum(per_q[i] for i in drawn if stop is None or i <= stop)
        samples += j if stop is None else min(j, stop + 1)
    return {
        "samples_per_question": j,
        "coverage": round(covered / n_train, 4) if n_train else 0.0,
        "samples_flat": j * n_train,
        "samples_adaptive": samples,
        "tokens_flat": round(flat),
        "tokens_adaptive": adaptive,
        "exact": exact,
        "estimated_samples": estimated,
    }


def coverage_by_task(kept: list[dict], train: list[Example]) -> dict[str, dict[str, Any]]:
    """Per task of a mix (the easy and the multi-step parts): training questions and the share covered."""
    covered = {row["qid"] for row in kept}
    out: dict[str, dict[str, Any]] = {}
    for ex in train:
        entry = out.setdefault(ex.task, {"train": 0, "covered": 0})
        entry["train"] += 1
        entry["covered"] += ex.id in covered
    for entry in out.values():
        entry["coverage"] = round(entry["covered"] / entry["train"], 4)
    return out


def plot_coverage(cost: dict[str, Any], path: Path) -> None:
    """coverage.png: training questions with a verified rationale against teacher samples drawn, flat k
    against adaptive (the data card's sampling_cost curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = cost["curve"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    cov = [100 * p["coverage"] for p in curve]
    ax.plot([p["samples_flat"] for p in curve], cov, "o-", label="flat k = 1..K")
    adaptive = f"adaptive (stop after {cost['stop_after']})"
    ax.plot([p["samples_adaptive"] for p in curve], cov, "s--", label=adaptive)
    ax.set_xlabel("teacher samples drawn")
    ax.set_ylabel("training questions covered (%)")
    ax.set_title("Coverage against teacher samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def chain_counts(records: list[dict]) -> dict[str, int]:
    """Where each record's chain came from: reasoning_content, reasoning, think, or none (a plain teacher)."""
    counts = Counter(r.get("chain_source") or "none" for r in records)
    return {k: counts.get(k, 0) for k in ("reasoning_content", "reasoning", "think", "none")}


_PARAMS_CACHE: dict[str, int | None] = {}


def _teacher_params(spec: str) -> int | None:
    """Parameter count for the card without loading the model twice: read GGUF metadata if cheap."""
    if spec in _PARAMS_CACHE:
        return _PARAMS_CACHE[spec]
    params = None
    if spec.startswith("gguf:"):
        try:
            from nestling.distill.teachers import resolve_gguf

            path = resolve_gguf(spec.removeprefix("gguf:"))
            from gguf import GGUFReader

            reader = GGUFReader(str(path))
            params = int(sum(int(t.n_elements) for t in reader.tensors))
        except Exception:  # the card is still useful without it
            params = None
    _PARAMS_CACHE[spec] = params
    return params
