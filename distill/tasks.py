"""Tasks: questions, gold answers, a verifier and an answer extractor.

    task = load_task("rg:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1")
    examples = task.examples(n=300, seed=0)
    train, heldout = split_examples(examples, heldout=0.2, seed=0)
    task.score(task.extract("... Answer: 7"), examples[0])

Specs:
    rg:NAME?k=v&k=v            a reasoning-gym dataset with its config (values: ints, floats, true/false,
                               comma lists such as ``operators=+,-,*``); scored with reasoning-gym's own
                               ``score_answer``, full credit only.
    mix:SPEC1,SPEC2,...        several tasks, ``n`` split evenly and interleaved. A comma starts a new part
                               only where it is followed by a scheme (``rg:``, ``file:``, ``hf:``), so
                               comma lists inside a part's query stay intact.
    file:PATH?question=q&answer=a
                               a .jsonl/.json/.csv file; column names default to question/answer; rows
                               without an answer get gold None (the self-consistency vote labels them).
    hf:NAME_OR_PATH?split=train&config=main&question=question&answer=answer
                               a Hugging Face dataset (a local path, or a hub name when online); gold
                               answers in gsm8k's ``... #### 42`` convention are cut after ``####``.

Questions are deduplicated by normalised text and splits are disjoint by it (reasoning-gym seeds item i with
seed + i, so two seeds overlap: one pool is drawn and split).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nestling.core.errors import NestlingError
from nestling.core.explain import answers_match, extract_answer, normalize_answer, safe_eval
from nestling.core.specs import parse_query, split_mix

log = logging.getLogger(__name__)

# Measured with the bundled SmolLM2 teacher, k=4, temperature 0.7, the worked-example prompt, 40 training
# questions each: basic_arithmetic (2 terms, operands 0-10, + - *) 82% of samples right, 92% of questions
# with a kept rationale; chain_sum (2 one-digit terms) 63% / 82%. Division is left out: reasoning-gym's
# division golds are mostly wrong (they are detected and dropped anyway).
EASY_PARTS = (
    "rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-,*"
    "&allow_parentheses=false&allow_negation=false",
    "rg:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1",
)
# The multi-step half: three one-digit terms, with operator precedence in basic_arithmetic (2 + 3 * 4 needs
# the product first). Two-term items are one fact each, so a rationale cannot teach a procedure there. The
# bundled teacher, 24 training questions each, k = 8 at T = 0.7 (benchmarks/results/teacher_tasks.json):
# precedence 12.5% of questions verified after 1 sample, 41.7% after 8; chain_sum 12.5% / 37.5% (both
# together, 80 questions: 11% / 32.5%). Greedy is far below pass@8, so verified samples hold more than the
# teacher usually does; two-digit sums (8% / 25%) and four terms (the 2% of samples) are harder.
MULTISTEP_PARTS = (
    "rg:basic_arithmetic?min_terms=3&max_terms=3&min_digits=1&max_digits=1&operators=+,-,*"
    "&allow_parentheses=false&allow_negation=false",
    "rg:chain_sum?min_terms=3&max_terms=3&min_digits=1&max_digits=1",
)
# Half easy (a curriculum the students can already learn), half multi-step; a mix splits n evenly.
DEFAULT_TASK = "mix:" + ",".join(EASY_PARTS + MULTISTEP_PARTS)


def normalize_question(q: str) -> str:
    """The key for dedupe and split disjointness: case- and whitespace-insensitive."""
    return " ".join(q.lower().split())


@dataclass
class Example:
    id: str
    task: str
    question: str
    gold: str | None
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "question": self.question,
            "gold": self.gold,
            "meta": self.meta,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Example:
        try:
            gold = row.get("gold")
            return cls(
                id=str(row["id"]),
                task=str(row["task"]),
                question=str(row["question"]),
                gold=None if gold is None else str(gold),
                meta=dict(row.get("meta") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise NestlingError(
                f"question row {row!r:.80}: missing or bad field {e}; re-run `nestling traces`"
            ) from None


class Task:
    """Base task: normalised exact / numeric match and the shared lenient extractor."""

    name: str = ""

    def examples(self, n: int, seed: int = 0) -> list[Example]:
        raise NotImplementedError

    def score(self, answer: str | None, example: Example) -> bool:
        if answer is None or example.gold is None:
            return False
        return answers_match(answer, example.gold)

    def extract(self, text: str) -> str | None:
        return extract_answer(text)

    def stats(self) -> dict[str, int]:
        """Counts from the last examples() call worth recording in a data card (e.g. wrong golds dropped)."""
        return dict(getattr(self, "_stats", {}))


def _parse_query(spec: str) -> tuple[str, dict[str, str]]:
    return parse_query(spec, what="task spec")


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    if "," in value:
        return [_coerce(v) for v in value.split(",") if v != ""]
    return value


def _pool_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


class ReasoningGymTask(Task):
    """A reasoning-gym dataset: gold from the generator, scored by its own score_answer (1.0 only)."""

    def __init__(self, spec: str):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        self.name = spec
        base, params = _parse_query(spec)
        self.dataset_name = base.removeprefix("rg:")
        if self.dataset_name not in DATASETS:
            close = [d for d in sorted(DATASETS) if d.startswith(self.dataset_name[:4])][:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise NestlingError(
                f"task {spec!r}: reasoning-gym has no dataset {self.dataset_name!r}{hint}; "
                f"see reasoning_gym.factory.DATASETS for the {len(DATASETS)} names"
            )
        self.config = {k: _coerce(v) for k, v in params.items()}
        if isinstance(self.config.get("operators"), str):
            self.config["operators"] = [self.config["operators"]]
        self._create = reasoning_gym.create_dataset
        self._scorer = self._make(size=1, seed=0)
        self._stats: dict[str, int] = {}

    def _make(self, size: int, seed: int):
        try:
            return self._create(self.dataset_name, size=size, seed=seed, **self.config)
        except (TypeError, ValueError, AssertionError) as e:
            raise NestlingError(
                f"task {self.name!r}: bad config for {self.dataset_name} ({e}); fix the query"
            ) from None

    def examples(self, n: int, seed: int = 0) -> list[Example]:
        """n distinct questions (by normalised text) from one pool; fewer if the config has fewer."""
        out: list[Example] = []
        seen: set[str] = set()
        wrong_gold = duplicates = 0
        size = max(2 * n, 16)
        # Small configs run out of distinct questions; grow the pool a bounded number of times.
        for _ in range(4):
            # reasoning-gym seeds item i with seed + i: space run seeds apart so seeds 3 and 4 do not
            # draw the same items shifted by one.
            ds = self._make(size=size, seed=seed * 1_000_003)
            out, seen, wrong_gold, duplicates = [], set(), 0, 0
            for i in range(size):
                try:
                    entry = ds[i]
                except (IndexError, ValueError, TypeError, KeyError, AssertionError) as e:
                    raise NestlingError(
                        f"task {self.name!r}: reasoning-gym cannot generate items with this config "
                        f"({type(e).__name__}: {e}); fix the query"
                    ) from None
                key = normalize_question(entry["question"])
                if key in seen:
                    duplicates += 1
                    continue
                if not self._gold_ok(entry):
                    wrong_gold += 1
                    continue
                seen.add(key)
                meta = {k: v for k, v in entry.get("metadata", {}).items() if _jsonable(v)}
                out.append(Example("", self.name, entry["question"], str(entry["answer"]), meta))
                if len(out) == n:
                    break
            if len(out) == n:
                break
            size *= 4
        if len(out) < n:
            log.warning(
                "%s: only %d distinct questions with a correct gold (asked for %d)", self.name, len(out), n
            )
        for i, ex in enumerate(out):
            ex.id = f"q{i:06d}"
        self._stats = {"wrong_gold_excluded": wrong_gold, "duplicate_questions_skipped": duplicates}
        return out

    @staticmethod
    def _gold_ok(entry: dict) -> bool:
        """Recompute gold for plain arithmetic: reasoning-gym 0.1.25 mislabels most division items."""
        expr = (entry.get("metadata") or {}).get("expression")
        if not isinstance(expr, str):
            return True
        try:
            value = safe_eval(expr)
        except (ValueError, ZeroDivisionError, OverflowError) as e:
            # "3 / 0" with gold 18 exists; anything else unparsable is not plain arithmetic: trust the gold.
            return "division by zero" not in str(e)
        text = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        return answers_match(str(entry["answer"]), text)

    def score(self, answer: str | None, example: Example) -> bool:
        if answer is None or example.gold is None:
            return False
        entry = {"question": example.question, "answer": example.gold, "metadata": example.meta}
        # score_answer compares strings: "13.0" or "13." would lose full credit for a right number.
        candidates = dict.fromkeys([answer.strip(), normalize_answer(answer)])
        for cand in candidates:
            try:
                if float(self._scorer.score_answer(cand, entry)) == 1.0:
                    return True
            except Exception:  # a scorer choking on odd text is a wrong answer, not a crash
                continue
        return False


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _gsm8k_gold(answer: str) -> str:
    """'reasoning... #### 1,234' -> '1234'-ish: the text after the last ####, as gsm8k writes golds."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


class RowsTask(Task):
    """Questions from rows (a file or a Hugging Face dataset); normalised exact or numeric match."""

    def __init__(self, spec: str, rows: list[dict], question_col: str, answer_col: str, source: str):
        self.name = spec
        if not rows:
            raise NestlingError(f"task {spec!r}: {source} has no rows")
        missing = [
            i
            for i, r in enumerate(rows, 1)
            if not isinstance(r, dict) or not str(r.get(question_col) or "").strip()
        ]
        if missing:
            cols = (
                ", ".join(sorted(rows[missing[0] - 1]))
                if isinstance(rows[missing[0] - 1], dict)
                else "not an object"
            )
            raise NestlingError(
                f"task {spec!r}: row {missing[0]} of {source} has no {question_col!r} "
                f"({len(missing)} such rows; "
                f"columns: {cols}); pass ?question=COLUMN"
            )
        self.rows = rows
        self.question_col, self.answer_col = question_col, answer_col
        self._stats: dict[str, int] = {}

    def examples(self, n: int, seed: int = 0) -> list[Example]:
        out: list[Example] = []
        seen: set[str] = set()
        duplicates = 0
        # Files keep their order when all rows fit; a seeded sample otherwise.
        order = range(len(self.rows)) if n >= len(self.rows) else _pool_order(len(self.rows), seed)
        for i in order:
            row = self.rows[i]
            q = str(row[self.question_col]).strip()
            key = normalize_question(q)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            raw = row.get(self.answer_col)
            gold = None if raw is None or str(raw).strip() == "" else _gsm8k_gold(str(raw))
            meta = {"row": i}
            if raw is not None and "####" in str(raw):
                meta["solution"] = str(raw).rsplit("####", 1)[0].strip()
            out.append(Example(f"q{len(out):06d}", self.name, q, gold, meta))
            if len(out) == n:
                break
        self._stats = {"duplicate_questions_skipped": duplicates}
        return out


def _read_file_rows(path: Path, spec: str) -> list[dict]:
    if not path.is_file():
        raise NestlingError(
            f"task {spec!r}: file {path} not found; pass file:PATH to a .jsonl, .json or .csv file"
        )
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NestlingError(f"task {spec!r}: {path} is not UTF-8 text; save it as UTF-8") from None
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise NestlingError(f"task {spec!r}: {path} is not valid JSON ({e}); fix the file") from None
        if not isinstance(data, list):
            raise NestlingError(f"task {spec!r}: {path} must hold a JSON list of objects")
        return data
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NestlingError(
                    f"task {spec!r}: {path} line {i} is not valid JSON ({e.msg}); fix or remove it"
                ) from None
            if not isinstance(row, dict):
                raise NestlingError(
                    f"task {spec!r}: {path} line {i} is not a JSON object; each line needs {{...}}"
                )
            rows.append(row)
        return rows
    raise NestlingError(f"task {spec!r}: {path} has suffix {suffix!r}; use .jsonl, .json or .csv")


def _file_task(spec: str) -> Task:
    base, params = _parse_query(spec)
    path = Path(base.removeprefix("file:")).expanduser()
    rows = _read_file_rows(path, spec)
    return RowsTask(spec, rows, params.get("question", "question"), params.get("answer", "answer"), str(path))


def _hf_task(spec: str) -> Task:
    base, params = _parse_query(spec)
    name = base.removeprefix("hf:")
    split = params.get("split", "train")
    config = params.get("config")
    try:
        import datasets
    except ImportError:
        raise NestlingError("hf: tasks need the `datasets` package; pip install 'nestling[train]'") from None
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif Path(name).is_dir() or Path(name).is_file():
            ds = datasets.load_dataset(name, config, split=split) if Path(name).is_dir() else None
            if ds is None:
                kind = "csv" if name.endswith(".csv") else "json"
                ds = datasets.load_dataset(kind, data_files=name, split=split)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline hub lookups, bad configs and missing splits all surface differently
        raise NestlingError(
            f"task {spec!r}: cannot load dataset {name!r} split {split!r} "
            f"({type(e).__name__}: {str(e)[:160]}); "
            "pass a local path, or a hub name while online"
        ) from None
    rows = [dict(r) for r in ds]
    return RowsTask(spec, rows, params.get("question", "question"), params.get("answer", "answer"), name)


class MixTask(Task):
    """Several tasks; n split evenly, interleaved; each example is scored by the task it came from."""

    def __init__(self, spec: str):
        self.name = spec
        parts = split_mix(spec)
        if not parts:
            raise NestlingError(f"task {spec!r}: empty mix; write mix:rg:NAME,rg:OTHER")
        self.parts = [load_task(p) for p in parts]
        self._by_name = {t.name: t for t in self.parts}
        self._stats: dict[str, int] = {}

    def examples(self, n: int, seed: int = 0) -> list[Example]:
        k = len(self.parts)
        per = [n // k + (1 if i < n % k else 0) for i in range(k)]
        lists = [t.examples(m, seed) for t, m in zip(self.parts, per, strict=True)]
        out: list[Example] = []
        seen: set[str] = set()
        stats: dict[str, int] = {}
        for t in self.parts:
            for key, v in t.stats().items():
                stats[key] = stats.get(key, 0) + v
        for i in range(max((len(x) for x in lists), default=0)):
            for lst in lists:
                if i < len(lst) and normalize_question(lst[i].question) not in seen:
                    seen.add(normalize_question(lst[i].question))
                    ex = lst[i]
                    out.append(Example(f"q{len(out):06d}", ex.task, ex.question, ex.gold, ex.meta))
        self._stats = stats
        return out

    def _task_of(self, example: Example) -> Task:
        return self._by_name.get(example.task, self.parts[0])

    def score(self, answer: str | None, example: Example) -> bool:
        return self._task_of(example).score(answer, example)


def load_task(spec: str) -> Task:
    """Parse a task spec (see the module docstring); NestlingError naming the fix on anything unknown."""
    spec = (spec or "").strip()
    if spec.startswith("rg:"):
        return ReasoningGymTask(spec)
    if spec.startswith("mix:"):
        return MixTask(spec)
    if spec.startswith("file:"):
        return _file_task(spec)
    if spec.startswith("hf:"):
        return _hf_task(spec)
    raise NestlingError(
        f"task {spec!r}: unknown kind; use rg:NAME[?k=v&...], mix:SPEC,SPEC, "
        "file:PATH[.jsonl|.csv] or hf:NAME_OR_PATH"
    )


class TaskScorer:
    """The one scorer of answers against gold: each row's own task (extractor and scorer), one Task object
    per task spec (a mix has several), loaded on first use. Every stage scores through it:

        scorer = TaskScorer()
        scorer.score(row, scorer.extract(row, text))   # eval: a questions.jsonl row (or an Example)
        scorer(text, prompt)                           # export's parity Prompt, a row or an Example
        score = scorer.by_index(rows)                  # score(i, text) for latency; None when rows lack gold

    Called on a text (``scorer(text, item)``), an item whose task is unknown or does not load is matched
    leniently (core.explain's extracted answer against its gold), with one warning per task; extract and
    score raise instead, because eval must not report a lenient accuracy as the task's."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._broken: set[str] = set()

    def task(self, spec: str) -> Task:
        if spec not in self._tasks:
            self._tasks[spec] = load_task(spec)
        return self._tasks[spec]

    def extract(self, row: dict, text: str) -> str | None:
        return self.task(row["task"]).extract(text)

    def score(self, row: dict, answer: str | None) -> bool:
        return self.score_example(Example.from_row(row), answer)

    def score_example(self, ex: Example, answer: str | None) -> bool:
        return bool(self.task(ex.task).score(answer, ex))

    def __call__(self, text: str, item: Any) -> bool:
        """`text` (a model's whole output) right for `item`: an Example, a question row, or anything with
        .example and .gold (export.parity.Prompt)."""
        ex, gold = _example_and_gold(item)
        task = self._loaded(ex.task) if ex is not None else None
        if task is not None:
            return bool(task.score(task.extract(text), ex))
        pred = extract_answer(text)
        return gold is not None and pred is not None and answers_match(pred, str(gold))

    def by_index(self, rows: list[dict]) -> Callable[[int, str], bool] | None:
        """score(i, text) for rows[i]; None when a row has no gold answer (nothing to score against)."""
        if not rows or any(r.get("gold") is None for r in rows):
            return None
        return lambda i, text: self(text, rows[i])

    def _loaded(self, spec: str) -> Task | None:
        if spec in self._broken:
            return None
        try:
            return self.task(spec)
        except Exception as e:  # a task that needs a missing extra or file: score leniently, and say so
            log.warning("task %s: cannot load its scorer (%s); using core.explain answer matching", spec, e)
            self._broken.add(spec)
            return None


def _example_and_gold(item: Any) -> tuple[Example | None, Any]:
    if isinstance(item, Example):
        return item, item.gold
    if isinstance(item, dict):
        return (Example.from_row(item) if item.get("task") else None), item.get("gold")
    return getattr(item, "example", None), getattr(item, "gold", None)


def trivial_baseline(
    train: list[Example],
    held: list[Example],
    score: Callable[[str | None, Example], bool] | TaskScorer | None = None,
) -> dict[str, Any]:
    """What a model that learned nothing scores: always the most common training gold of the question's task.

    The one baseline every report shows beside an accuracy (data card, eval, run report). `score(answer,
    example)` is the task's own scorer, e.g. ``load_task(spec).score``, or a TaskScorer (each example's own
    task; a new one by default).
    """
    if score is None or isinstance(score, TaskScorer):
        scorer = score or TaskScorer()
        score = lambda answer, ex: scorer.score_example(ex, answer)  # noqa: E731 (Task.score's order)
    answers: dict[str, str] = {}
    for task in sorted({ex.task for ex in train}):
        golds = Counter(ex.gold for ex in train if ex.task == task and ex.gold is not None)
        if golds:
            answers[task] = golds.most_common(1)[0][0]

    def accuracy(examples: list[Example]) -> float | None:
        graded = [ex for ex in examples if ex.gold is not None]
        return sum(score(answers.get(ex.task), ex) for ex in graded) / len(graded) if graded else None

    held_acc = accuracy(held)
    return {
        "answers": answers,
        "train_accuracy": accuracy(train),
        "heldout_accuracy": held_acc,
        "accuracy": held_acc,
        "n": len(held),
    }


def split_examples(
    examples: list[Example], heldout: int | float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, heldout), disjoint by normalised question text and by arithmetic expression (a mix asks
    "3 + 4" in several wordings, and a student must not see the held-out sum under another one);
    deterministic in seed.

    `heldout` < 1 is a fraction of the groups of questions sharing a text or an expression (the distinct
    questions), >= 1 a count of questions: whole groups go to one side, the held-out side filled up to the
    count (exactly, unless only groups larger than the remainder are left).
    """
    if heldout < 0:
        raise NestlingError(f"heldout {heldout}: must be >= 0 (a fraction < 1 or a count)")
    groups = _overlap_groups(examples)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if heldout < 1:
        held_ids = {id(ex) for key in keys[: round(heldout * len(keys))] for ex in groups[key]}
    else:
        count = int(heldout)
        if count > len(examples):
            raise NestlingError(
                f"heldout {heldout}: more than the {len(examples)} distinct questions; lower it or raise n"
            )
        held_ids = set()
        for key in keys:
            if len(held_ids) + len(groups[key]) <= count:
                held_ids.update(id(ex) for ex in groups[key])
            if len(held_ids) == count:
                break
    train = [ex for ex in examples if id(ex) not in held_ids]
    held = [ex for ex in examples if id(ex) in held_ids]
    return train, held


def _overlap_groups(examples: list[Example]) -> dict[str, list[Example]]:
    """Examples joined when they share a normalised question or expression (union-find over both keys),
    keyed by the group's smallest normalised question."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def keys(ex: Example) -> list[str]:
        out = ["q:" + normalize_question(ex.question)]
        expr = (ex.meta or {}).get("expression")
        if isinstance(expr, str) and expr.strip():
            out.append("e:" + "".join(expr.split()))
        return out

    for ex in examples:
        first, *rest = keys(ex)
        for k in rest:
            parent[root(k)] = root(first)
        root(first)
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(root(keys(ex)[0]), []).append(ex)
    return {min(normalize_question(e.question) for e in g): g for g in groups.values()}
