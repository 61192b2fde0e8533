"""The run directory's layout in one place, and the one reader of its questions.

    run = RunDir("runs/default")
    run.questions_file          # runs/default/traces/questions.jsonl
    run.student("tiny")         # runs/default/students/tiny (its model in .../model)
    train, held = run.splits()  # the rows of questions.jsonl by split; held-out ones raise if there are none
    RunDir.of_student("runs/default/students/tiny/model")  # RunDir("runs/default"); None outside a run

docs/DESIGN.md ("Run directory") describes every file; a stage that needs a path asks this object, so a
change of layout is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestling.core.errors import NestlingError
from nestling.core.manifest import read_jsonl


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_student(cls, model_dir: str | Path) -> RunDir | None:
        """The run a trained student's model directory (RUN/students/NAME/model) belongs to; None for a
        model outside a run (an hf:DIR checkpoint exported as it is)."""
        d = Path(model_dir).resolve()
        if d.name != "model" or d.parent.parent.name != "students":
            return None
        run = cls(d.parents[2])
        return run if run.questions_file.is_file() else None

    @property
    def traces(self) -> Path:
        return self.root / "traces"

    @property
    def questions_file(self) -> Path:
        return self.traces / "questions.jsonl"

    @property
    def kept_file(self) -> Path:
        return self.traces / "kept.jsonl"

    @property
    def datacard(self) -> Path:
        return self.traces / "datacard.json"

    @property
    def students(self) -> Path:
        return self.root / "students"

    def student(self, name: str) -> Path:
        return self.students / name

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def export(self, name: str) -> Path:
        return self.exports / name

    @property
    def teacher_eval(self) -> Path:
        """The greedy teacher's held-out result, cached by eval."""
        return self.root / "teacher_eval.json"

    @property
    def teacher_vote(self) -> Path:
        """A task without gold: the teacher's vote labels of the held-out split, cached by eval."""
        return self.root / "teacher_vote.json"

    def eval_file(self, suffix: str = "json", student: str | None = None) -> Path:
        """eval.json / eval.md: the run's side-by-side table, or one student's result (cached by eval)."""
        return (self.student(student) if student else self.root) / f"eval.{suffix}"

    def latency(self, name: str) -> Path:
        return self.root / "latency" / f"{name}.json"

    def calculator(self, name: str) -> Path:
        """The default variant of export ``name`` answering with the calculator (nestling.latency)."""
        return self.root / "latency" / f"{name}.calculator.json"

    def questions(self) -> list[dict[str, Any]]:
        """Every row of questions.jsonl: {id, task, question, gold, split, meta}."""
        return read_jsonl(self.questions_file, fix="re-run `nestling traces`")

    def heldout(self) -> list[dict[str, Any]]:
        """The held-out rows, in file order (empty when the run kept none)."""
        return [r for r in self.questions() if r.get("split") == "heldout"]

    def splits(self, gold_only: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(train rows, held-out rows); no held-out row is an error. gold_only: the held-out rows with a gold
        answer, or every held-out row when the task has no gold answers at all (a vote-labelled task)."""
        rows = self.questions()
        train = [r for r in rows if r.get("split") == "train"]
        held = [r for r in rows if r.get("split") == "heldout"]
        if not held:
            raise NestlingError(
                f"{self.questions_file}: no held-out questions; re-run traces with a held-out share "
                "(--heldout)"
            )
        if gold_only:
            held = [r for r in held if r.get("gold") is not None] or held
        return train, held
