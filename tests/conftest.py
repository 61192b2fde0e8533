"""Shared fixtures: a tiny llama student built and briefly trained in the test, and its export.

    def test_x(tiny_student_dir, tiny_export_dir): ...

The student (2 layers, hidden 256, GQA 4/2 heads, byte-level BPE) learns the student prompt format on
synthetic one-digit sums for a few dozen steps: enough for non-degenerate greedy output that sometimes
ends with eos. Nothing is downloaded. ``build_tiny_student`` is importable for benchmarks.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nestling.core.prompting import explain_target, student_prompt

TINY_STEPS = 80


def arithmetic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, gold) pairs of one-digit sums and differences."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-")
        rows.append((f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)))
    return rows


def training_texts(rows: list[tuple[str, str]]) -> list[str]:
    out = []
    for q, gold in rows:
        expr = q.removeprefix("What is ").rstrip("?")
        out.append(student_prompt(q, explain=True) + explain_target([f"{expr} = {gold}"], gold))
    return out


def build_tiny_student(out_dir: Path, steps: int = TINY_STEPS, seed: int = 0, lr: float = 1e-2) -> Path:
    """Train and save the tiny student in ``save_pretrained`` form; returns out_dir."""
    import torch
    from nestling.distill.students import StudentPreset, new_student, save_student, train_tokenizer

    torch.manual_seed(seed)
    texts = training_texts(arithmetic_rows(400, seed))
    extra = ["Ünïcödé · naïve café 日本語 emoji 🙂", "  spaces   and\ttabs\n\nnew lines 12345 67.89"]
    tok = train_tokenizer(texts + extra, vocab_size=384)
    preset = StudentPreset(256, 512, 2, 4, 2, vocab_size=len(tok), max_position_embeddings=256)
    model = new_student(preset, tok, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tok.eos_token
    enc = [tok(t + eos)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    labels = torch.full((len(enc), width), -100)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        labels[i, : len(e)] = torch.tensor(e)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(enc), (16,), generator=gen)
        loss = model(
            input_ids=ids[batch], attention_mask=(labels[batch] != -100).long(), labels=labels[batch]
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_student(model, tok, out_dir)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_student(tmp_path_factory.mktemp("student") / "model")


@pytest.fixture(scope="session")
def tiny_prompts() -> list[tuple[str, str]]:
    """Held-out style (question, gold) pairs for parity checks."""
    return arithmetic_rows(12, seed=123)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_student_dir: Path, tiny_prompts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every variant of the tiny student exported and parity-checked (the manifest records the checks)."""
    from nestling.export.pipeline import ExportConfig, export_student

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_student(ExportConfig(student=str(tiny_student_dir), out=str(out), threads=1), prompts=tiny_prompts)
    return out
