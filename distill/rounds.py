"""Rounds (expert iteration: STaR, ReST-EM): the trained student samples, its verified rationales join the
training set, and the next round retrains from the base model on teacher rows + every verified student row.

    nestling distill --out runs/x --students tiny --rounds 3                 # 2 extra rounds at most
    nestling run --out runs/x --rounds 2 --round-samples 4 --round-fresh 100 --round-dev 50

With --rounds N > 1, for each student:
  RUN/rounds/<name>/r1/student/       round 1: trained on the teacher's verified rows (a fresh train of the
                                      same recipe in RUN/students/<name> is taken over, not retrained)
  RUN/rounds/<name>/rK/rows.jsonl     rows round K-1's student wrote, verified like the teacher's (filters.
                                      filter_traces) and tagged "source": "student:NAME:roundK"
  RUN/rounds/<name>/rK/manifest.json  stage "round": questions tried, solved, fresh kept, samples, filters
  RUN/rounds/<name>/rK/student/       round K: from the base model on teacher rows + student rows r2..rK
  RUN/rounds/<name>/rK/dev.json       its accuracy on the dev split (fresh generator questions, not held-out)
  RUN/rounds/<name>/rK/eval.json      its held-out eval, explain and answer-only (reported, never chosen on)
  RUN/rounds/<name>/manifest.json     stage "rounds": every round's figures, the best round, why it stopped
  RUN/students/<name>/                the best round's student on dev (files hard-linked), its train manifest
                                      plus "round": what eval, compress and export read

Round K samples --round-samples rationales at --round-temperature (seeded per question, round and sample) on
the training questions still without a verified rationale and on --round-fresh fresh questions from the task's
generator (distill.fresh.draw_fresh: never a held-out question by text or expression, and never a dev one).
The rounds stop when the dev accuracy does not improve, when a round adds no verified row, or after N. Every
step is cached by its manifest, so a killed run re-run with the same command continues where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.manifest import (
    atomic_write_json,
    fingerprint,
    is_fresh,
    read_jsonl,
    read_manifest,
    try_read_json,
    try_read_manifest,
    verify_files,
    write_jsonl,
    write_manifest,
)
from nestling.core.prompting import student_prompt
from nestling.core.rundir import RunDir

if TYPE_CHECKING:
    from nestling.distill.pipeline import DistillConfig
    from nestling.distill.tasks import Example
    from nestling.distill.train import TrainConfig

    from nestling.core.calculator import Slip

log = logging.getLogger(__name__)

# Long enough for the multi-step chains the students write in explain mode: eval's budget.
MAX_NEW_TOKENS = 128
SAMPLE_BATCH = 16


@dataclass
class RoundsConfig:
    """What the rounds of one run do (the DistillConfig fields --rounds, --round-*)."""

    rounds: int = field(default=1, metadata={"help": "training rounds (1 = the teacher's rows only)"})
    samples: int = field(default=4, metadata={"help": "rationales each student samples per question"})
    fresh: int = field(default=100, metadata={"help": "fresh generator questions sampled on per round"})
    dev: int = field(default=50, metadata={"help": "fresh dev questions (0 = no early stop)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    rationalize: bool = field(
        default=False, metadata={"help": "STaR rationalization: unsolved questions again, gold as a hint"}
    )
    calculator: bool = field(
        default=False, metadata={"help": "students sample with the calculator in the loop, as the teacher"}
    )
    seed: int = field(default=0, metadata={"help": "seed for questions and samples"})

    def __post_init__(self) -> None:
        check(self.rounds >= 1, f"--rounds {self.rounds}: must be >= 1 (1 = no extra round)")
        check(self.samples >= 1, f"--round-samples {self.samples}: must be >= 1")
        check(self.fresh >= 0, f"--round-fresh {self.fresh}: must be >= 0")
        check(self.dev >= 0, f"--round-dev {self.dev}: must be >= 0 (0 = no early stop)")
        check(self.temperature > 0, f"--round-temperature {self.temperature}: must be > 0")

    def sampling(self) -> dict[str, Any]:
        # Options off keep their key out, so rounds sampled before an option existed stay cached.
        keep = ("samples", "fresh", "temperature", "seed") + tuple(
            k for k in ("rationalize", "calculator") if getattr(self, k)
        )
        return {k: getattr(self, k) for k in keep} | {"max_new_tokens": MAX_NEW_TOKENS}


def rounds_config(cfg: DistillConfig) -> RoundsConfig:
    return RoundsConfig(
        rounds=cfg.rounds,
        samples=cfg.round_samples,
        fresh=cfg.round_fresh,
        dev=cfg.round_dev,
        temperature=cfg.round_temperature,
        rationalize=cfg.round_rationalize,
        # The students sample as the teacher wrote: its rows and theirs then carry the same arithmetic.
        calculator=bool(cfg.teacher_calculator) if cfg.round_calculator is None else cfg.round_calculator,
        seed=cfg.seed,
    )


@dataclass
class _Ctx:
    """One student's rounds: the run, its questions, the task and where everything goes."""

    run: Path
    name: str
    tcfg: TrainConfig
    rcfg: RoundsConfig
    questions: list[dict]
    task: str
    filters: Any  # the traces stage's FilterConfig: students are verified as the teacher was
    eval_limit: int | None

    @property
    def root(self) -> Path:
        return self.run / "rounds" / self.name

    def round_dir(self, r: int) -> Path:
        return self.root / f"r{r}"


def run_rounds(cfg: DistillConfig, tcfg: TrainConfig) -> Path:
    """Every round of one student (see the module docstring); returns RUN/students/<name>: the best round."""
    from nestling.distill.evaluate import traces_config as traces_manifest_config
    from nestling.distill.pipeline import traces_config

    run = Path(cfg.out)
    questions = RunDir(run).questions()
    ctx = _Ctx(
        run=run,
        name=tcfg.name or tcfg.spec.name,
        tcfg=tcfg,
        rcfg=rounds_config(cfg),
        questions=questions,
        task=str(traces_manifest_config(run).get("task") or questions[0]["task"]),
        filters=traces_config(cfg).filters(),
        eval_limit=cfg.eval_limit,
    )
    dev = dev_questions(ctx)
    history: list[dict[str, Any]] = []
    student_rows: list[dict] = []
    stopped = "rounds"
    for r in range(1, ctx.rcfg.rounds + 1):
        if r > 1:
            added, counts = sample_round(ctx, r, student_rows, dev)
            if not added:
                stopped = "no new verified row"
                break
            student_rows = dedupe_rows(student_rows + added)
        student = train_round(ctx, r, student_rows)
        entry = {"round": r, "student": str(student), "student_rows": len(student_rows)}
        entry |= {"sampling": counts} if r > 1 else {}
        entry["dev"] = dev_score(ctx, student, dev) if dev else None
        entry["heldout"] = heldout_eval(ctx, student)
        history.append(entry)
        if r > 1 and dev and entry["dev"]["accuracy"] <= max(h["dev"]["accuracy"] for h in history[:-1]):
            stopped = "dev did not improve"
            break
    best = _best(history, bool(dev))
    published = publish(ctx, history[best - 1])
    write_manifest(
        ctx.root,
        stage="rounds",
        config={**ctx.rcfg.sampling(), "rounds": ctx.rcfg.rounds, "dev": ctx.rcfg.dev},
        inputs={"train": tcfg.recipe()},
        metrics={"rounds": history, "best_round": best, "stopped_by": stopped, "dev_questions": len(dev)},
    )
    log.info("%s: %d round(s), best round %d (stopped by %s)", ctx.name, len(history), best, stopped)
    return published


def _best(history: list[dict[str, Any]], by_dev: bool) -> int:
    """The round with the highest dev accuracy (the earliest on a tie); the last round without a dev split."""
    if not by_dev:
        return history[-1]["round"]
    return max(history, key=lambda h: (h["dev"]["accuracy"], -h["round"]))["round"]


# ---- questions -----------------------------------------------------------------------------------------


def dev_questions(ctx: _Ctx) -> list[Example]:
    """--round-dev fresh generator questions: disjoint from the run's train and held-out questions (by text,
    and from held-out ones by expression), so choosing a round on them never looks at the held-out split."""
    from nestling.distill.fresh import draw_fresh

    if ctx.rcfg.dev == 0 or ctx.rcfg.rounds == 1:
        return []
    dev = draw_fresh(ctx.task, ctx.questions, ctx.rcfg.dev, seed=ctx.rcfg.seed + 100_003)
    check(
        bool(dev),
        f"--round-dev {ctx.rcfg.dev}: task {ctx.task} draws no fresh question for a dev split; pass "
        "--round-dev 0 to run every round without early stopping",
    )
    for i, ex in enumerate(dev):
        ex.id = f"dev{i:05d}"
    return dev


def round_questions(ctx: _Ctx, r: int, student_rows: list[dict], dev: list[Example]) -> list[Example]:
    """What round r samples on: training questions without a verified rationale yet, then --round-fresh
    fresh ones (none held-out, none dev: dev questions are excluded by text and expression like held-out)."""
    from nestling.distill.fresh import draw_fresh
    from nestling.distill.tasks import Example
    from nestling.distill.train import training_rows

    covered = {str(row["qid"]) for row in training_rows(ctx.run) + student_rows}
    train = [Example.from_row(q) for q in ctx.questions if q.get("split") == "train"]
    uncovered = [ex for ex in train if ex.id not in covered]
    fence = ctx.questions + [{**ex.to_row(), "split": "heldout"} for ex in dev]
    fresh = draw_fresh(ctx.task, fence, ctx.rcfg.fresh, seed=ctx.rcfg.seed + 200_003 * r)
    for i, ex in enumerate(fresh):
        ex.id = f"r{r}f{i:05d}"
    return uncovered + fresh


def question_seed(seed: int, r: int, question: str, j: int) -> int:
    """Sample j's noise seed for a question in round r: its text, not its position, so the same question is
    sampled alike whatever else the round holds."""
    from nestling.distill.tasks import normalize_question

    key = f"{seed}:{r}:{j}:{normalize_question(question)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


# ---- sampling ------------------------------------------------------------------------------------------


def sample_round(ctx: _Ctx, r: int, student_rows: list[dict], dev: list[Example]) -> tuple[list[dict], dict]:
    """Round r-1's student samples on round r's questions; (its verified rows, the counts). Cached in rK/."""
    out = ctx.round_dir(r)
    prev = ctx.round_dir(r - 1) / "student"
    examples = round_questions(ctx, r, student_rows, dev)
    inputs = {
        "student": (try_read_manifest(prev) or {}).get("files", {}),
        "questions": fingerprint([ex.to_row() for ex in examples]),
    }
    config = {**ctx.rcfg.sampling(), "round": r, "filters": vars(ctx.filters)}
    if is_fresh(out, "round", config, inputs):
        m = try_read_manifest(out) or {}
        log.info("%s: round %d samples up to date", ctx.name, r)
        return read_jsonl(out / "rows.jsonl"), m.get("metrics", {})
    records = sample_records(prev / "model", examples, ctx.rcfg, r)
    rows, counts = verify(ctx, r, records, examples)
    if ctx.rcfg.rationalize:
        solved = {row["qid"] for row in rows}
        unsolved = [ex for ex in examples if ex.id not in solved and ex.gold is not None]
        hinted, stats = verify(
            ctx, r, sample_records(prev / "model", unsolved, ctx.rcfg, r, hint=True), unsolved
        )
        for row in hinted:
            row["source"] += ":rationalized"
        rows += hinted
        counts["rationalized"] = {
            "tried": len(unsolved),
            "solved": len({row["qid"] for row in hinted}),
            "rows_kept": len(hinted),
            "sample_accuracy": stats["sample_accuracy"],
        }
    write_jsonl(out / "rows.jsonl", rows)
    write_manifest(out, stage="round", config=config, inputs=inputs, files=["rows.jsonl"], metrics=counts)
    return rows, counts


def sample_records(
    model_dir: Path, examples: list[Example], rcfg: RoundsConfig, r: int, hint: bool = False
) -> list[dict]:
    """k explain-mode samples per question from the student, as trace records the filters read. hint: the
    question carries its gold answer (STaR's rationalization); the record, and the row the filters make of
    it, keep the question as asked, so the student learns to reach the answer without the hint."""
    from nestling.distill.students import load_student
    from nestling.distill.tasks import TaskScorer
    from tqdm.auto import tqdm

    model, tok = load_student(model_dir)
    scorer = TaskScorer()
    jobs = [(ex, j) for ex in examples for j in range(rcfg.samples)]
    records = []
    for i in tqdm(range(0, len(jobs), SAMPLE_BATCH), desc=f"round {r} samples", mininterval=1.0):
        batch = jobs[i : i + SAMPLE_BATCH]
        prompts = [student_prompt(_hinted(ex) if hint else ex.question) for ex, _ in batch]
        seeds = [question_seed(rcfg.seed, r, ex.question, j + 1000 * hint) for ex, j in batch]
        if rcfg.calculator:
            outs = sample_calculated(model, tok, prompts, seeds, MAX_NEW_TOKENS, rcfg.temperature)
        else:
            outs = [_Sampled.of(tok, ids) for ids in _sample_texts(model, tok, prompts, seeds, MAX_NEW_TOKENS,
                                                                   rcfg.temperature)]  # fmt: skip
        for (ex, j), out in zip(batch, outs, strict=True):
            answer = scorer.task(ex.task).extract(out.text) if out.text.strip() else None
            records.append(
                {
                    "id": f"{ex.id}:{j}",
                    "qid": ex.id,
                    "sample": j,
                    "task": ex.task,
                    "rationale": out.text,
                    "answer": answer,
                    "correct": scorer.score_example(ex, answer) if ex.gold is not None else None,
                    "truncated": out.truncated,
                    **({"corrections": out.corrections} if rcfg.calculator else {}),
                }
            )
    return records


@dataclass
class _Sampled:
    """One sampled rationale: its text, whether the token budget cut it, the calculator's corrections."""

    text: str = ""
    truncated: bool = False
    corrections: int = 0
    spent: int = 0  # tokens generated in all, a corrected piece's discarded tail included
    checked: int = 0  # where the first line the calculator has not read yet starts in text

    @classmethod
    def of(cls, tok: Any, ids: list[int]) -> _Sampled:
        ended = tok.eos_token_id in ids
        return cls(tok.decode(ids, skip_special_tokens=True), not ended and len(ids) >= MAX_NEW_TOKENS)

    def read(self, text: str, final: bool) -> Slip | None:
        """The calculator on each finished line of ``text`` (and its last one when ``final``): on the first
        false result, self.text is cut right after it with the true value written; else self.text = text."""
        from nestling.core.calculator import read_lines

        self.checked, slip = read_lines(text, self.checked, final)
        self.text = text if slip is None else text[: self.checked] + slip.text
        self.corrections += slip is not None
        return slip


def _sample_texts(
    model: Any, tok: Any, texts: list[str], seeds: list[int], max_new: list[int] | int, temperature: float
) -> list[list[int]]:
    from nestling.distill.onpolicy import sample

    return sample(
        model,
        [tok(t)["input_ids"] for t in texts],
        seeds=seeds,
        max_new=max_new,
        temperature=temperature,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
    )


def sample_calculated(
    model: Any, tok: Any, prompts: list[str], seeds: list[int], max_new: int, temperature: float
) -> list[_Sampled]:
    """Batched sampling with the calculator in the loop, as the teacher's `traces --calculator` and
    `Reasoner.ask(calculator=True)` write: a row whose finished line states a false result is cut right
    after it, the true value written, and sampled on from the corrected text (prompt and text read again,
    the next piece's noise seeded from the row's seed and the piece), at most MAX_CORRECTIONS times and
    within max_new tokens in all. The rows a round keeps then carry the student's procedure with true
    arithmetic: what the teacher's calculator traces carry."""
    from nestling.serve.runtime import MAX_CORRECTIONS

    rows = [_Sampled() for _ in prompts]
    active, piece = list(range(len(prompts))), 0
    while active:
        outs = _sample_texts(
            model,
            tok,
            [prompts[i] + rows[i].text for i in active],
            [(seeds[i] + 1_000_003 * piece) % 2**63 for i in active],
            [max_new - rows[i].spent for i in active],
            temperature,
        )
        again = []
        for i, ids in zip(active, outs, strict=True):
            row, ended = rows[i], tok.eos_token_id in ids
            row.spent += len(ids)
            text = row.text + tok.decode(ids, skip_special_tokens=True)
            slip = row.read(text, final=ended) if row.corrections < MAX_CORRECTIONS else None
            if slip is None:
                row.text, row.truncated = text, not ended and row.spent >= max_new
            elif row.spent < max_new:
                again.append(i)
            else:
                row.truncated = True
        active, piece = again, piece + 1
    return rows


def _hinted(ex: Example) -> str:
    return f"{ex.question} (The answer is {ex.gold}.)"


def verify(ctx: _Ctx, r: int, records: list[dict], examples: list[Example]) -> tuple[list[dict], dict]:
    """The teacher's filters on the student's samples; kept rows tagged with their source and round."""
    from nestling.distill.filters import filter_traces

    kept, stats = filter_traces(records, examples, ctx.filters)
    for row in kept:
        row["source"] = f"student:{ctx.name}:round{r}" + (":calculator" if ctx.rcfg.calculator else "")
    train_ids = {ex.id for ex in examples if not ex.id.startswith(f"r{r}f")}
    solved = {row["qid"] for row in kept}
    counts = {
        "questions_tried": len(examples),
        "train_tried": len(train_ids),
        "train_solved": len(solved & train_ids),
        "fresh_tried": len(examples) - len(train_ids),
        "fresh_kept": len(solved - train_ids),
        "samples": len(records),
        "sample_accuracy": round(sum(bool(x["correct"]) for x in records) / max(1, len(records)), 4),
        "rows_kept": len(kept),
        "filters": stats["filters"],
        "right_answer_wrong_steps": stats["right_answer_wrong_steps"],
        "right_answer_ungrounded_steps": stats["right_answer_ungrounded_steps"],
    }
    if ctx.rcfg.calculator:
        from nestling.distill.traces import calculator_counts

        counts["calculator"] = calculator_counts(records)
    return kept, counts


def dedupe_rows(rows: list[dict]) -> list[dict]:
    """One row per (question, step list): a question drawn in two rounds keeps each distinct path once."""
    from nestling.distill.tasks import normalize_question

    seen: set[tuple[str, tuple[str, ...]]] = set()
    out = []
    for row in rows:
        key = (normalize_question(row["question"]), tuple(" ".join(s.lower().split()) for s in row["steps"]))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# ---- train, score, publish -----------------------------------------------------------------------------


def train_round(ctx: _Ctx, r: int, student_rows: list[dict]) -> Path:
    """Round r's student from the base model (the spec's own init, never round r-1's weights)."""
    from nestling.distill.train import fingerprint_inputs, train, training_rows

    out = ctx.round_dir(r) / "student"
    if r == 1:
        _adopt(RunDir(ctx.run).student(ctx.name), out, ctx.tcfg.recipe(), fingerprint_inputs(ctx.run))
        return train(ctx.tcfg, out=out)
    return train(ctx.tcfg, rows=training_rows(ctx.run) + student_rows, out=out)


def _adopt(src: Path, dst: Path, recipe: dict[str, Any], inputs: dict[str, Any]) -> None:
    """A run trained with --rounds 1 already holds round 1 in RUN/students/<name>: link it in, not retrain."""
    if is_fresh(dst, "train", recipe, inputs) or not is_fresh(src, "train", recipe, inputs):
        return
    _link_copy(src / "model", dst / "model")
    shutil.copyfile(src / "manifest.json", dst / "manifest.json")


def _link_copy(src: Path, dst: Path) -> None:
    """dst replaced by a copy of src whose files are hard links where the filesystem allows (a model's
    weights are never rewritten in place: save_model_dir replaces whole directories)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def publish(ctx: _Ctx, entry: dict[str, Any]) -> Path:
    """RUN/students/<name> becomes the best round's student, with its train manifest plus "round"."""
    src, dst = Path(entry["student"]), RunDir(ctx.run).student(ctx.name)
    m = try_read_manifest(src) or {}
    current = try_read_manifest(dst) or {}
    if current.get("files") != m.get("files") or current.get("round") != entry["round"] or not _intact(dst):
        dst.mkdir(parents=True, exist_ok=True)
        _link_copy(src / "model", dst / "model")
        atomic_write_json(dst / "manifest.json", {**m, "round": entry["round"], "rounds": str(ctx.root)})
    return dst


def _intact(student: Path) -> bool:
    """Its files as its manifest lists them (a kill mid-publish leaves the old manifest beside no model)."""
    try:
        verify_files(student, read_manifest(student))
    except NestlingError:
        return False
    return True


def _model_key(student: Path, questions: list[dict], what: str) -> str:
    files = (try_read_manifest(student) or {}).get("files", {})
    return fingerprint({"model": files, "questions": questions, "what": what, "max_new": MAX_NEW_TOKENS})


def dev_score(ctx: _Ctx, student: Path, dev: list[Example]) -> dict[str, Any]:
    """Greedy explain-mode accuracy on the dev questions, cached in the round's dev.json."""
    from nestling.distill.evaluate import generate
    from nestling.distill.scoring import score_outputs
    from nestling.distill.students import load_student
    from nestling.distill.tasks import TaskScorer

    rows = [ex.to_row() for ex in dev]
    path, key = student.parent / "dev.json", _model_key(student, rows, "dev")
    cached = try_read_json(path)
    if cached and cached.get("key") == key:
        return cached["result"]
    model, tok = load_student(student / "model")
    texts, _, _ = generate(model, tok, [student_prompt(r["question"]) for r in rows], MAX_NEW_TOKENS, 32,
                           f"dev {ctx.name}", True)  # fmt: skip
    m = score_outputs(rows, texts, TaskScorer(), explain=False)
    result = {"accuracy": m["accuracy"], "accuracy_ci": m["accuracy_ci"], "n": m["n"]}
    atomic_write_json(path, {"stage": "round-dev", "key": key, "result": result})
    return result


def heldout_eval(ctx: _Ctx, student: Path) -> dict[str, Any]:
    """The round's student on the run's held-out questions, explain and answer-only with 95% intervals (as
    the eval stage scores every student), cached in the round's eval.json. Reported, never selected on."""
    from nestling.distill.evaluate import EvalConfig, student_eval
    from nestling.distill.tasks import TaskScorer

    _, held = RunDir(ctx.run).splits()
    held = held[: ctx.eval_limit] if ctx.eval_limit else held
    path, key = student.parent / "eval.json", _model_key(student, held, "heldout")
    cached = try_read_json(path)
    if cached and cached.get("key") == key:
        return cached["result"]
    res = student_eval(student / "model", held, TaskScorer(), EvalConfig(latency_samples=0), ctx.name)
    result = {
        mode: {k: res[mode][k] for k in ("accuracy", "accuracy_ci", "n")} for mode in ("explain", "answer")
    }
    atomic_write_json(path, {"stage": "round-eval", "key": key, "result": result})
    return result
