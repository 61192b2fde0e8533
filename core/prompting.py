"""The student's prompt format, shared by training (distill), export (chat template) and the runtime.

A student sees ``Question: ...`` followed by a mode marker and learns two continuations (multi-task, as in
Distilling Step-by-Step):

    student_prompt("What is 2 + 3?", explain=True)   -> "Question: What is 2 + 3?\\nExplain:"
        target: "\\nStep 1: 2 + 3 = 5\\nAnswer: 5" + eos
    student_prompt("What is 2 + 3?", explain=False)  -> "Question: What is 2 + 3?\\nAnswer:"
        target: " 5" + eos
"""

from __future__ import annotations

PROMPT_FORMAT = "nestling-v1"
EXPLAIN_MARK = "Explain:"
ANSWER_MARK = "Answer:"


def student_prompt(question: str, explain: bool = True) -> str:
    q = " ".join(question.split())
    return f"Question: {q}\n{EXPLAIN_MARK if explain else ANSWER_MARK}"


def explain_target(steps: list[str], answer: str) -> str:
    """The canonical rationale a student learns and the runtime parses back (see core.explain)."""
    lines = [f"Step {i}: {s.strip()}" for i, s in enumerate(steps, 1) if s.strip()]
    return "\n" + "\n".join([*lines, f"{ANSWER_MARK} {answer.strip()}"])


def answer_target(answer: str) -> str:
    return " " + answer.strip()


# Jinja chat template for exported models (llama.cpp server, Ollama): the last user message becomes an
# explain-mode prompt. Rendered by peers in their own sandboxed environments.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'Question: ' + (message['content'] | trim) + '\\nExplain:' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
