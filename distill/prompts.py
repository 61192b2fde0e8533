"""The one teacher prompt: numbered steps, one calculation per step, a final ``Answer:`` line.

    teacher_messages("Calculate 7 * 8.")                 # system + worked example + question
    teacher_messages("Calculate 7 * 8.", fewshot=False)  # system + question

A worked example raised SmolLM2-135M's ``Answer:`` line compliance from ~4% to ~60% (measured); steps
written as ``a op b = c`` are what core.explain checks, so the example shows exactly that form.
"""

from __future__ import annotations

import hashlib
import json

SYSTEM = (
    "You are a careful tutor. Solve the problem step by step. Number the steps. Write every calculation "
    "as an equation such as 3 + 4 = 7. End with a last line of the form 'Answer: <answer>'."
)

# (question, worked rationale) pairs shown before the real question. One short arithmetic example: measured
# on the default mix (16 questions x 4 samples, SmolLM2) it gave 70% right samples; a longer two-step
# example plus a letter-counting example gave 19% (the model copied their shape and numbers).
FEWSHOT: list[tuple[str, str]] = [("Calculate 3 + 4.", "Step 1: 3 + 4 = 7.\nAnswer: 7")]


def teacher_messages(question: str, fewshot: bool = True) -> list[dict]:
    """Chat messages for one question (OpenAI format: role/content dicts)."""
    messages = [{"role": "system", "content": SYSTEM}]
    if fewshot:
        for q, a in FEWSHOT:
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
