"""Parity of every exported artifact with the PyTorch student, checked through ``serve.engines``.

    ref = torch_reference(model, tokenizer, prompts, max_new_tokens=64)
    res = check_variant("onnx-fp32", engine, ref, tokenizer, prompts, max_new_tokens=64, logit_tol=1e-3,
                        exact=True)
    raise_on_failures({"onnx-fp32": res})     # NestlingError when an exact variant does not match

Definitions (per variant, over the held-out prompts):
- ``tokenization_match``: share of texts (prompts, PyTorch's outputs, a fixed set of tricky strings) that the
  engine tokenizes exactly like the Hugging Face tokenizer.
- ``greedy_match``: share of prompts whose whole greedy continuation equals PyTorch's, token for token.
- ``greedy_match_within_tol``: the same, counting a divergence as a match when it happens at a near tie:
  PyTorch's margin between the two candidate tokens is at most twice the engine's measured logit error at
  that position, and that error is within the tolerance (f16 rounding can flip such a tie, nothing else).
- ``teacher_forced_top1``: on PyTorch's own sequences, share of generated positions where the engine's
  argmax equals PyTorch's.
- ``max_abs_logit_diff``: largest |engine - PyTorch| logit over every position of those sequences.
- ``accuracy``: held-out accuracy of the engine's own greedy outputs; ``accuracy_delta`` = minus PyTorch's.
- ``tokens_per_s``: decode speed, greedy, eos ignored, SPEED_TOKENS tokens after the first prompt (tokens
  after the first / time after the first), median of SPEED_REPEATS, on this machine as it is at the time.

Unquantized variants (``exact=True``) must have tokenization_match 1.0, greedy_match_within_tol 1.0 and
max_abs_logit_diff <= logit_tol, else NestlingError: an export that silently lost accuracy never ships.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nestling.core.errors import NestlingError
from nestling.core.prompting import student_prompt

if TYPE_CHECKING:
    from nestling.serve.engines import Engine

log = logging.getLogger(__name__)

# Digits, spacing, punctuation and non-ASCII: where byte-level BPE ports most often disagree.
TOKENIZATION_PROBES = [
    "What is 12 + 345?",
    "1234567890 0.5 -3 1,000 3/4 1e-5",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnew\n\nlines",
    "Ünïcödé naïve café",
    "日本語のテキスト",
    "emoji 🙂👍🏽",
    "Step 1: 9 + 8 = 17\nAnswer: 17",
    "don't won't it's I'm we'll they've",
    "MiXeD CaSe and UPPER",
    "a" * 40,
    "x=y+z;(a*b)/c%d",
]


SPEED_TOKENS = 64
SPEED_REPEATS = 3


def decode_speed(
    engine: Engine, ids: list[int], n: int = SPEED_TOKENS, repeats: int = SPEED_REPEATS
) -> float:
    """Median decode tokens/s over a fixed count (eos ignored, so every variant decodes the same work)."""
    rates = []
    for _ in range(repeats):
        t_first, count = 0.0, 0
        for _tok in engine.stream(ids, n, stop_at_eos=False):
            count += 1
            if count == 1:
                t_first = time.perf_counter()
        if count > 1:
            rates.append((count - 1) / (time.perf_counter() - t_first))
    return float(np.median(rates)) if rates else 0.0


def torch_greedy(model: Any, ids: list[int], max_new_tokens: int, eos: int | None = None) -> Iterator[int]:
    """Greedy tokens from the PyTorch student with its KV cache (stops at `eos`, which is not yielded)."""
    import torch

    def forward(input_ids: list[list[int]], past: Any = None) -> Any:
        with torch.inference_mode():  # per call: a suspended generator must not leave the mode on
            return model(input_ids=torch.tensor(input_ids), past_key_values=past, use_cache=True)

    res = forward([ids])
    for n in range(max_new_tokens):
        tok = int(res.logits[0, -1].argmax())
        if tok == eos:
            return
        yield tok
        if n + 1 < max_new_tokens:
            res = forward([[tok]], res.past_key_values)


def torch_decode_speed(
    model: Any, ids: list[int], n: int = SPEED_TOKENS, repeats: int = SPEED_REPEATS
) -> float:
    """decode_speed's measurement for the PyTorch student (eos ignored, timed from the first token)."""
    rates = []
    for _ in range(repeats):
        t_first = 0.0
        for count, _tok in enumerate(torch_greedy(model, ids, n), 1):
            if count == 1:
                t_first = time.perf_counter()
        rates.append((n - 1) / (time.perf_counter() - t_first))
    return float(np.median(rates))


@dataclass
class Prompt:
    """One held-out question, rendered in the student prompt format."""

    question: str
    gold: str | None
    text: str = ""
    example: Any = None  # distill.tasks.Example when the task is known

    def __post_init__(self) -> None:
        if not self.text:
            self.text = student_prompt(self.question, explain=True)


@dataclass
class Reference:
    """PyTorch's greedy continuations and teacher-forced logits for each prompt."""

    prompt_ids: list[list[int]]
    outputs: list[list[int]]  # greedy continuation, eos excluded
    logits: list[np.ndarray]  # (T, V) over prompt + output
    texts: list[str]
    accuracy: float | None
    tokens_per_s: float


@dataclass
class VariantResult:
    tokenization_match: float
    greedy_match: float
    greedy_match_within_tol: float
    teacher_forced_top1: float
    max_abs_logit_diff: float
    accuracy: float | None
    accuracy_delta: float | None
    tokens_per_s: float
    logit_tol: float | None = None
    exact_required: bool = False
    greedy_divergences: list[str] = field(default_factory=list)  # the first few, for the manifest
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


Scorer = Callable[[str, Prompt], bool]


def _accuracy(texts: list[str], prompts: list[Prompt], scorer: Scorer) -> float | None:
    graded = [(t, p) for t, p in zip(texts, prompts, strict=True) if p.gold is not None or p.example]
    if not graded:
        return None
    return sum(scorer(t, p) for t, p in graded) / len(graded)


def torch_reference(
    model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int, scorer: Scorer | None = None
) -> Reference:
    """Greedy decoding with a KV cache in PyTorch (the ground truth), plus teacher-forced logits."""
    import torch
    from nestling.distill.tasks import TaskScorer
    from rich.progress import track

    scorer = scorer or TaskScorer()
    eos = tokenizer.eos_token_id
    pids, outs, logits, texts = [], [], [], []
    for p in track(prompts, description="PyTorch reference", transient=True):
        ids = tokenizer(p.text)["input_ids"]
        out = list(torch_greedy(model, ids, max_new_tokens, eos))
        with torch.inference_mode():
            logits.append(model(input_ids=torch.tensor([ids + out])).logits[0].float().numpy())
        pids.append(ids)
        outs.append(out)
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
    return Reference(
        prompt_ids=pids,
        outputs=outs,
        logits=logits,
        texts=texts,
        accuracy=_accuracy(texts, prompts, scorer),
        tokens_per_s=torch_decode_speed(model, pids[0]) if pids else 0.0,
    )


def tokenization_match(engine: Engine, tokenizer: Any, texts: list[str]) -> tuple[float, list[str]]:
    """Share of texts tokenized identically by engine and HF tokenizer, and the first few that differ."""
    bad = [t for t in texts if engine.tokenize(t) != tokenizer(t)["input_ids"]]
    return 1.0 - len(bad) / max(1, len(texts)), bad[:3]


@dataclass
class _PromptCheck:
    """One prompt through the engine against PyTorch: free-run tokens, then teacher-forced logits."""

    text: str
    greedy: bool  # identical continuation
    within: bool  # identical, or first divergence at a near tie the engine's logit error can flip
    agree: int  # teacher-forced positions whose argmax matches
    positions: int
    max_diff: float
    divergence: str | None = None


def _compare(
    engine: Engine, ids: list[int], want: list[int], out: list[int], tf_ref: Any, logit_tol: float | None
) -> _PromptCheck:
    seq = ids + want
    tf = engine.logits(seq)
    diff = np.abs(tf - tf_ref)
    gen = slice(len(ids) - 1, len(seq))  # positions predicting each output token and the final eos
    check = _PromptCheck(
        text=engine.detokenize(out),
        greedy=out == want,
        within=out == want,
        agree=int((tf[gen].argmax(-1) == tf_ref[gen].argmax(-1)).sum()),
        positions=len(seq) - len(ids) + 1,
        max_diff=float(diff.max()),
    )
    if out != want:
        check.within, check.divergence = _near_tie(engine, ids, want, out, tf_ref, diff, logit_tol)
    return check


def _near_tie(
    engine: Engine, ids: list[int], want: list[int], out: list[int], tf_ref: Any, diff: Any, tol: float | None
) -> tuple[bool, str]:
    """Whether the first divergence is a near tie: the engine's own logit error at that position is enough
    to flip the argmax (each of the two logits may move by up to that error), and that error is within
    tolerance."""
    k = next((j for j, (a, b) in enumerate(zip(out, want, strict=False)) if a != b), None)
    pos = len(ids) - 1 + (k if k is not None else min(len(out), len(want)))
    got = out[k] if k is not None else (out[len(want)] if len(out) > len(want) else engine.eos_id)
    exp = want[k] if k is not None else (want[len(out)] if len(want) > len(out) else engine.eos_id)
    margin = float(tf_ref[pos, exp] - tf_ref[pos, got]) if got is not None and exp is not None else 0
    local = float(diff[min(pos, len(ids) + len(want) - 1)].max())
    tie = tol is not None and local <= tol and abs(margin) <= 2 * local + 1e-6
    where = f"at token {pos - len(ids) + 1} (PyTorch margin {margin:.4f}, local |dlogit| {local:.4f})"
    return tie, where


def check_variant(
    name: str,
    engine: Engine,
    ref: Reference,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    logit_tol: float | None = None,
    exact: bool = False,
    scorer: Scorer | None = None,
) -> VariantResult:
    """Compare one engine with the PyTorch reference; failures (tokenization, and with exact=True any
    greedy or logit mismatch beyond tolerance) are listed in the result for raise_on_failures."""
    from nestling.distill.tasks import TaskScorer
    from rich.progress import track

    probe_texts = [p.text for p in prompts] + [t for t in ref.texts if t] + TOKENIZATION_PROBES
    tok_match, tok_bad = tokenization_match(engine, tokenizer, probe_texts)
    checks = []
    for i, ids in enumerate(track(ref.prompt_ids, description=f"parity {name}", transient=True)):
        out = list(engine.stream(ids, max_new_tokens))
        checks.append(_compare(engine, ids, ref.outputs[i], out, ref.logits[i], logit_tol))
    divergences = [f"prompt {i} {c.divergence}" for i, c in enumerate(checks) if c.divergence]
    acc = _accuracy([c.text for c in checks], prompts, scorer or TaskScorer())
    n = max(1, len(prompts))
    res = VariantResult(
        tokenization_match=tok_match,
        greedy_match=sum(c.greedy for c in checks) / n,
        greedy_match_within_tol=sum(c.within for c in checks) / n,
        teacher_forced_top1=sum(c.agree for c in checks) / max(1, sum(c.positions for c in checks)),
        max_abs_logit_diff=max([0.0, *(c.max_diff for c in checks)]),
        accuracy=acc,
        accuracy_delta=(acc - ref.accuracy) if acc is not None and ref.accuracy is not None else None,
        tokens_per_s=decode_speed(engine, ref.prompt_ids[0]) if ref.prompt_ids else 0.0,
        logit_tol=logit_tol,
        exact_required=exact,
        greedy_divergences=divergences[:5],
    )
    res.failures = _failures(res, tok_bad, divergences)
    log.info(
        "%s: tok %.3f greedy %.3f tf-top1 %.3f max|dlogit| %.4g acc %s %.0f tok/s", name, tok_match,
        res.greedy_match, res.teacher_forced_top1, res.max_abs_logit_diff, acc, res.tokens_per_s,
    )  # fmt: skip
    return res


def _failures(res: VariantResult, tok_bad: Any, divergences: list[str]) -> list[str]:
    failures = []
    if res.tokenization_match < 1.0:
        failures.append(f"tokenization differs from Hugging Face on {tok_bad!r}")
    if res.exact_required and res.greedy_match_within_tol < 1.0:
        failures.append(f"greedy tokens differ from PyTorch: {'; '.join(divergences[:3])}")
    tol = res.logit_tol
    if res.exact_required and tol is not None and res.max_abs_logit_diff > tol:
        failures.append(f"max |logit diff| {res.max_abs_logit_diff:.4g} exceeds the tolerance {tol:g}")
    return failures


def raise_on_failures(results: dict[str, VariantResult]) -> None:
    """NestlingError naming every variant that mis-tokenizes, or must match exactly and does not."""
    bad = {k: r.failures for k, r in results.items() if r.failures}
    if bad:
        detail = " | ".join(f"{k}: {'; '.join(v)}" for k, v in bad.items())
        raise NestlingError(f"export parity failed, nothing written: {detail}")
