"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes, the teacher scores every token of
what it wrote, and the student moves toward the teacher's distribution on its own samples.

    loss = generalized_jsd(student_logits, teacher_logprobs, beta=0.5)    # (B, K) per position
    texts = sample(student, tok, [prompt_ids, ...], seeds=[...], max_new=96, temperature=1.0)
    scorer = load_scorer("llamacpp:smollm2", student_tok)                # top-k logprobs of given tokens
    ids, logprobs = scorer.score([[1, 5, 9, 2]], k=20)[0]                # (T - 1, k) each

``distill.train`` runs the loop (``--lmbda``: the share of optimizer steps trained on the student's samples,
the rest being the off-policy KD/CE steps on the verified rationales). Teachers that score:
  hf:DIR / gguf:smollm2   a transformers model with full logits (train.load_kd_teacher): the normal case; it
                          must share the student's tokenizer
  llamacpp:smollm2|PATH   a GGUF through llama.cpp (logits_all), top-k per position
  openai:MODEL@URL        an OpenAI-compatible server that returns top-k logprobs of the prompt's own tokens
                          (vLLM's ``prompt_logprobs``); llama.cpp's server reports ``n_probs`` for the tokens
                          it generates only, so it cannot score given tokens and is not supported
A top-k teacher's ids are mapped to the student's by token string: every student token must be in the
teacher's vocabulary (a vocabulary-trimmed student of that teacher is), else the scorer refuses in one line.
Teacher mass on tokens the student lacks is dropped and the rest renormalised over the shared top-k.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nestling.core.errors import NestlingError

log = logging.getLogger(__name__)

# Stands in for log(0) on a top-k slot that holds no token: finite, so 0 * (a - b) never becomes NaN.
NEG = -1e4


# ---- the loss ------------------------------------------------------------------------------------------


def generalized_jsd(
    student_logits: Any,
    teacher_logprobs: Any,
    beta: float,
    temperature: float = 1.0,
    teacher_ids: Any = None,
) -> Any:
    """Per-position generalized Jensen-Shannon divergence, as TRL's GKDTrainer defines it.

    beta = 0: KL(teacher || student) (forward); beta = 1: KL(student || teacher) (reverse); in between
    beta * KL(teacher || M) + (1 - beta) * KL(student || M) with M = beta * teacher + (1 - beta) * student.
    `student_logits` (..., V); `teacher_logprobs` (..., V), or (..., k) with `teacher_ids` (..., k) naming
    the student ids they belong to: both sides are then renormalised over those k ids (a slot holding
    NEG is no token). Both are divided by `temperature` first. Returns (...,).
    """
    import torch
    import torch.nn.functional as F

    s = student_logits.float()
    t = teacher_logprobs.float()
    if teacher_ids is not None:
        s = torch.where(t > NEG / 2, s.gather(-1, teacher_ids), torch.full_like(t, NEG))
    s = F.log_softmax(s / temperature, dim=-1)
    t = F.log_softmax(t / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


# ---- sampling ------------------------------------------------------------------------------------------


def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    max_new: Sequence[int] | int,
    temperature: float,
    eos_id: int,
    pad_id: int,
) -> list[list[int]]:
    """Token ids the model samples after each prompt (eos included when it stops), with a KV cache.

    Row i draws its noise from its own generator seeded by seeds[i] (Gumbel-max), so a completion depends on
    its prompt, its seed and the weights, not on which other prompts share the batch: N processes sampling
    their shards draw what one process draws, and a resumed run draws what the uninterrupted one did.
    """
    import torch

    device = next(model.parameters()).device
    n = len(prompts)
    limits = [max_new] * n if isinstance(max_new, int) else list(max_new)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)  # (B, P), left-padded
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p))
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    gens = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out: list[list[int]] = [[] for _ in range(n)]
    done = [lim <= 0 for lim in limits]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            step = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            for _ in range(max(limits, default=0)):
                logits = step.logits[:, -1].float().cpu() / max(temperature, 1e-6)  # (B, V)
                nxt = torch.full((n,), pad_id, dtype=torch.long)
                for i in range(n):
                    if done[i]:
                        continue
                    u = torch.rand(logits.shape[1], generator=gens[i]).clamp_(1e-10, 1 - 1e-10)
                    tok = int((logits[i] - torch.log(-torch.log(u))).argmax())
                    nxt[i] = tok
                    out[i].append(tok)
                    done[i] = tok == eos_id or len(out[i]) >= limits[i]
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
                pos = pos[:, -1:] + 1
                step = model(
                    input_ids=nxt[:, None].to(device),
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=step.past_key_values,
                    use_cache=True,
                )
    finally:
        model.train(was_training)
    return out


# ---- teachers that score -------------------------------------------------------------------------------


class TokenScorer(Protocol):
    """A teacher that scores given token ids (the student's vocabulary): for a sequence of T tokens, row t of
    (ids, logprobs), both (T - 1, k), is its top-k for the token at t + 1. Unused slots hold id 0 and NEG."""

    def score(self, sequences: Sequence[Sequence[int]], k: int) -> list[tuple[Any, Any]]: ...


def student_tokens(tok: Any) -> list[str]:
    """The student's token strings, by id."""
    return tok.convert_ids_to_tokens(list(range(len(tok))))


@dataclass
class VocabMap:
    """Student ids <-> teacher ids through token strings (exact for a vocabulary-trimmed student)."""

    to_teacher: list[int]  # student id -> teacher id
    to_student: dict[int, int]  # teacher id -> student id, for the teacher ids the student has

    @classmethod
    def build(cls, student: list[str], teacher: list[str], spec: str) -> VocabMap:
        index = {s: i for i, s in enumerate(teacher)}
        missing = [s for s in student if s not in index]
        if missing:
            raise NestlingError(
                f"teacher {spec!r}: {len(missing)} of the student's {len(student)} tokens are not in its "
                f"vocabulary (e.g. {missing[0]!r}); KD needs the teacher's tokenizer or a trim of it"
            )
        to_teacher = [index[s] for s in student]
        return cls(to_teacher, {t: s for s, t in enumerate(to_teacher)})

    def topk_rows(self, rows: Sequence[Sequence[tuple[int, float]]], k: int) -> tuple[Any, Any]:
        """Per position, (teacher id, logprob) pairs -> ((L, k) student ids, (L, k) logprobs)."""
        import numpy as np

        ids = np.zeros((len(rows), k), dtype=np.int64)
        lps = np.full((len(rows), k), NEG, dtype=np.float32)
        for r, pairs in enumerate(rows):
            kept = [(self.to_student[t], lp) for t, lp in pairs if t in self.to_student]
            for j, (sid, lp) in enumerate(sorted(kept, key=lambda p: -p[1])[:k]):
                ids[r, j], lps[r, j] = sid, max(lp, NEG)
        return ids, lps


class HFScorer:
    """A transformers teacher through the TokenScorer interface (train.py uses its full logits directly)."""

    def __init__(self, model: Any, batch: int = 8):
        self.model, self.batch = model.eval(), batch

    def score(self, sequences: Sequence[Sequence[int]], k: int) -> list[tuple[Any, Any]]:
        import torch

        out = []
        with torch.no_grad():
            for seq in sequences:
                x = torch.tensor([list(seq)], device=next(self.model.parameters()).device)
                lp = torch.log_softmax(self.model(input_ids=x).logits[0, :-1].float(), -1)  # (T - 1, V)
                top = lp.topk(min(k, lp.shape[-1]), dim=-1)
                out.append((top.indices.cpu().numpy(), top.values.cpu().numpy()))
        return out


class LlamaCppScorer:
    """A GGUF teacher through llama.cpp: one eval per sequence with logits_all=True (llama-cpp-python fills
    `scores` for every position only then), log-softmax and top-k in numpy. n_ctx 0: the model's own."""

    def __init__(self, spec: str, path: Any, student_tok: Any, n_threads: int = 1, n_ctx: int = 0):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise NestlingError(
                f"teacher {spec!r} needs llama-cpp-python; pip install 'nestling[gguf]'"
            ) from None
        try:
            # n_threads_batch defaults to every core whatever n_threads is: pinned, as for the GGUF teacher.
            self.llm = Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                logits_all=True, verbose=False,
            )  # fmt: skip
        except (ValueError, RuntimeError) as e:
            raise NestlingError(f"teacher {spec!r}: llama.cpp cannot load {path} ({e})") from None
        self.map = VocabMap.build(student_tokens(student_tok), gguf_tokens(path), spec)

    def score(self, sequences: Sequence[Sequence[int]], k: int) -> list[tuple[Any, Any]]:
        import numpy as np

        out = []
        for seq in sequences:
            ids = [self.map.to_teacher[i] for i in seq]
            self.llm.reset()
            self.llm.eval(ids)
            logits = np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float64)  # (T - 1, V_teacher)
            lp = logits - logits.max(-1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
            top = np.argsort(-lp, axis=-1)[:, : 4 * k]  # spare slots for teacher tokens the student lacks
            rows = [[(int(t), float(lp[r, t])) for t in top[r]] for r in range(len(top))]
            out.append(self.map.topk_rows(rows, k))
        return out


def gguf_tokens(path: Any) -> list[str]:
    """tokenizer.ggml.tokens of a GGUF file, read with gguf-py."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


class OpenAIScorer:
    """An OpenAI-compatible server scoring given tokens: POST /completions with the token ids as the prompt,
    ``max_tokens`` 1 and vLLM's ``prompt_logprobs`` k; up to `concurrency` sequences in flight.

    The server's ids are taken to be the teacher tokenizer's: `teacher_tokens` (the served model's token
    strings, from its tokenizer) maps them to the student's; without it the student's ids are sent as they
    are, which is right only when the server serves the student's own tokenizer.
    """

    def __init__(
        self,
        spec: str,
        model: str,
        base_url: str,
        student_tok: Any,
        teacher_tokens: list[str] | None = None,
        concurrency: int = 8,
        api_key: str | None = None,
    ):
        import openai

        self.spec, self.model, self.concurrency = spec, model, concurrency
        self.client = openai.OpenAI(base_url=base_url.rstrip("/"), api_key=api_key or "none", max_retries=2)
        names = student_tokens(student_tok)
        self.map = VocabMap.build(names, teacher_tokens or names, spec)

    def _one(self, seq: Sequence[int], k: int) -> tuple[Any, Any]:
        ids = [self.map.to_teacher[i] for i in seq]
        per_pos = prompt_logprobs(self.client, self.model, self.spec, ids, k)
        # Entry t is the distribution of token t given the tokens before it; entry 0 is None.
        rows = [[(int(t), float(v["logprob"])) for t, v in (entry or {}).items()] for entry in per_pos[1:]]
        return self.map.topk_rows(rows, k)

    def score(self, sequences: Sequence[Sequence[int]], k: int) -> list[tuple[Any, Any]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda s: self._one(s, k), sequences))


def prompt_logprobs(client: Any, model: str, spec: str, ids: list[int], k: int) -> list[Any]:
    """One /completions call scoring the given ids (vLLM's ``prompt_logprobs``): its per-token entries."""
    import openai

    try:
        reply = client.completions.create(
            model=model, prompt=ids, max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": k},
        )  # fmt: skip
    except openai.OpenAIError as e:
        raise NestlingError(f"teacher {spec!r}: scoring failed ({type(e).__name__}: {e})") from None
    choice = reply.choices[0]
    extra = choice.model_extra or {}
    per_pos = getattr(choice, "prompt_logprobs", None) or extra.get("prompt_logprobs")
    if not isinstance(per_pos, list) or len(per_pos) != len(ids):
        raise NestlingError(
            f"teacher {spec!r}: the server returned no prompt_logprobs for {len(ids)} tokens; "
            "it must score given tokens (vLLM's prompt_logprobs)"
        )
    return per_pos


def is_scorer_spec(spec: str) -> bool:
    return spec.partition(":")[0] in ("llamacpp", "openai")


def load_scorer(
    spec: str, student_tok: Any, n_threads: int = 1, teacher_tokens: list[str] | None = None
) -> Any:
    """``llamacpp:smollm2|PATH`` or ``openai:MODEL@URL`` -> a TokenScorer over the student's vocabulary."""
    import os

    from nestling.distill.teachers import resolve_gguf

    kind, _, rest = spec.partition(":")
    if kind == "llamacpp" and rest:
        return LlamaCppScorer(spec, resolve_gguf(rest), student_tok, n_threads=n_threads)
    if kind == "openai" and rest:
        model, _, base = rest.partition("@")
        if not model or not base.startswith(("http://", "https://")):
            raise NestlingError(f"teacher {spec!r}: write openai:MODEL@http://HOST:PORT/v1")
        key = os.environ.get("NESTLING_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return OpenAIScorer(spec, model, base, student_tok, teacher_tokens, api_key=key)
    raise NestlingError(f"teacher {spec!r}: a scoring teacher is llamacpp:smollm2|PATH or openai:MODEL@URL")


def scores_to_batch(scores: list[tuple[Any, Any]], keep: Any, k: int) -> tuple[Any, Any]:
    """Per-sequence (T_i - 1, k) top-k rows -> (B, K, k) tensors at the kept positions `keep` (K,)."""
    import torch

    n, cols = len(scores), keep.tolist()
    ids = torch.zeros((n, len(cols), k), dtype=torch.long)
    lps = torch.full((n, len(cols), k), NEG, dtype=torch.float32)
    for b, (sid, slp) in enumerate(scores):
        for j, c in enumerate(cols):
            if c < len(sid):
                ids[b, j], lps[b, j] = torch.as_tensor(sid[c]), torch.as_tensor(slp[c])
    return ids.to(keep.device), lps.to(keep.device)


def check_scorer_spec(spec: str) -> None:
    """Refuse, before any trace is written, a scoring teacher that training would refuse: a missing GGUF or
    no llama-cpp-python for ``llamacpp:``; for ``openai:``, a server that does not score given tokens (one
    request scoring two tokens, so a chat-only endpoint fails now and not after the traces)."""
    import importlib.util
    import os

    from nestling.distill.teachers import resolve_gguf

    kind, _, rest = spec.partition(":")
    if kind == "llamacpp" and rest:
        resolve_gguf(rest)
        if importlib.util.find_spec("llama_cpp") is None:
            raise NestlingError(f"teacher {spec!r} needs llama-cpp-python; pip install 'nestling[gguf]'")
        return
    if kind != "openai" or not rest:
        load_scorer(spec, None)  # the unknown-spec message, in one place
    import openai

    model, _, base = rest.partition("@")
    if not model or not base.startswith(("http://", "https://")):
        raise NestlingError(f"teacher {spec!r}: write openai:MODEL@http://HOST:PORT/v1")
    key = os.environ.get("NESTLING_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.OpenAI(base_url=base.rstrip("/"), api_key=key, max_retries=0, timeout=10.0)
    prompt_logprobs(client, model, spec, [0, 1], 1)


def spec_vocab(source: str) -> dict[str, int] | None:
    """token -> id of a gguf:/llamacpp: file or an hf:DIR's tokenizer.json, read without loading weights;
    None where it cannot be read offline (a hub name: checked when training loads it)."""
    from nestling.distill.teachers import resolve_gguf

    kind, _, rest = source.partition(":")
    if kind in ("gguf", "llamacpp"):
        path = resolve_gguf(rest)
        return {t: i for i, t in reversed(list(enumerate(gguf_tokens(path))))}
    path = Path(rest).expanduser() / "tokenizer.json"
    if kind != "hf" or not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
