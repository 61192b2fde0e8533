"""The one teacher prompt: numbered steps, one calculation per step, a final ``Answer:`` line.

    teacher_messages("Calculate 7 * 8.")                 # system + the worked example most like it + question
    teacher_messages("Calculate 7 * 8.", fewshot=False)  # system + question

A worked example raised SmolLM2-135M's ``Answer:`` line compliance from ~4% to ~60% (measured); steps
written as ``a op b = c`` are what core.explain checks, so the examples show exactly that form.
"""

from __future__ import annotations

import hashlib
import json
import re

SYSTEM = (
    "You are a careful tutor. Solve the problem step by step. Number the steps. Write every calculation "
    "as an equation such as 3 + 4 = 7. End with a last line of the form 'Answer: <answer>'."
)

# (question, worked rationale) pairs; each question is shown the ONE most like it (demonstrations chosen by
# similarity, as in Liu et al. 2022): as many numbers, then the most words in common. SmolLM2-135M copies
# the example's shape, so the shape must fit the question. Measured on the default mix's training side
# (benchmarks/bench_teacher_prompts.py, greedy): one one-step example for every question gave 10% on the
# three-term half, written as one claim restating the expression; one two-step example for every question
# gave 23% there in two steps, but the two-term half fell from 70% to 15-20% (two steps invented); both
# examples shown together, the model copied the first.
FEWSHOT: list[tuple[str, str]] = [
    ("Calculate 3 + 4.", "Step 1: 3 + 4 = 7.\nAnswer: 7"),
    ("Calculate 6 - 2 * 3.", "Step 1: 2 * 3 = 6.\nStep 2: 6 - 6 = 0.\nAnswer: 0"),
    (
        "State the final answer to the following arithmetic problem: 5 + 7 - 3 =",
        "Step 1: 5 + 7 = 12.\nStep 2: 12 - 3 = 9.\nAnswer: 9",
    ),
]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")


def _closest(question: str) -> tuple[str, str]:
    """The worked example most like the question: the same count of numbers, then the most shared words."""
    n, words = len(_NUMBER.findall(question)), set(_WORD.findall(question.lower()))

    def distance(ex: tuple[str, str]) -> tuple[int, float]:
        theirs = set(_WORD.findall(ex[0].lower()))
        shared = len(words & theirs) / max(len(words | theirs), 1)
        return abs(len(_NUMBER.findall(ex[0])) - n), -shared

    return min(FEWSHOT, key=distance)  # the first of equals: the one-step example for a question of no number


def teacher_messages(question: str, fewshot: bool = True) -> list[dict]:
    """Chat messages for one question (OpenAI format: role/content dicts)."""
    messages = [{"role": "system", "content": SYSTEM}]
    if fewshot:
        q, a = _closest(question)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question.strip()})
    return messages


def prompt_hash(messages: list[dict]) -> str:
    """sha256 of the rendered messages: records which exact prompt produced a rationale."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def prompt_card(fewshot: bool) -> dict:
    """The prompt as the data card records it: the template with a {question} placeholder and its hash."""
    template = teacher_messages("{question}", fewshot)
    return {"messages": template, "fewshot": fewshot, "sha256": prompt_hash(template)}
