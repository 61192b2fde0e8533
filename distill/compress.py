"""Compress a trained student: trim its vocabulary to the task, prune width and/or depth, recover with KD.

    nestling compress --run runs/x --source smollm2 --intermediate-size 768     # half of every MLP
    nestling compress --run runs/x --source smollm2 --keep-layers 9 --objective mix --beta 1   # + on-policy

Reads RUN/students/<source>/model (a save_pretrained llama, usually the self-distilled student) and writes
  RUN/students/<source>-trim/   the source with its vocabulary trimmed: lossless on task text, and the KD
                                teacher of the compact student (both share one tokenizer, as KD needs)
  RUN/students/<name>/          the compact student: trimmed, depth/width pruned by measured importance,
                                then trained by ``distill.train`` with logit KD from the trimmed source plus
                                cross-entropy on the verified rationales and on fresh verified ones
                                (--objective off-policy, the default); on-policy: every step the student
                                samples on training and fresh questions and the trimmed source scores
                                each sampled token (GKD; distill.onpolicy); mix: --lmbda of the steps so
  RUN/compress/<name>/          the recovery run: traces/kept.jsonl = the run's verified rows + rows the
                                source wrote (greedy, verified) for freshly drawn training questions
Every directory is in save_pretrained form with a manifest, so ``nestling eval`` and ``nestling export``
take them as they are.

The pieces are usable alone:
    model, tok, kept = trim_vocab(model, tok, texts)      # tokenization of `texts` is unchanged
    scores = layer_importance(model, tok, texts)          # angular distance in/out of each layer
    model = keep_layers(model, select_layers(scores, 15))
    model = prune_mlp(model, tok, texts, intermediate_size=768)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestling.core.config import check
from nestling.core.errors import NestlingError
from nestling.core.manifest import is_fresh, read_jsonl, read_manifest, write_jsonl, write_manifest
from nestling.core.prompting import answer_target, explain_target, student_prompt
from nestling.core.rundir import RunDir

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)


# ---- vocabulary trimming -------------------------------------------------------------------------------


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def kept_token_ids(tok: PreTrainedTokenizerFast, texts: Iterable[str]) -> list[int]:
    """Ids a trimmed vocabulary must keep so that `texts` tokenize exactly as before.

    Special and added tokens, the 256 byte-level symbols (any other text still encodes), every token the
    texts encode to, and the merge closure: both parents of every kept merged token, recursively. BPE on a
    word applies the lowest-ranked applicable merge each time; every merge it applied to a corpus word
    produced a kept token, so with the other merges removed it makes the same choices.
    """
    from tokenizers import pre_tokenizers

    tj = json.loads(tok.backend_tokenizer.to_str())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise NestlingError(f"vocabulary trimming needs a byte-level BPE tokenizer, not {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    keep = {a["id"] for a in tj.get("added_tokens", [])} | set(tok.all_special_ids)
    keep |= {vocab[ch] for ch in pre_tokenizers.ByteLevel.alphabet() if ch in vocab}
    for ids in tok(list(texts), add_special_tokens=True)["input_ids"]:
        keep.update(ids)
    parents: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merge_pairs(model.get("merges", [])):
        parents.setdefault(a + b, []).append((a, b))
    by_id = {i: s for s, i in vocab.items()}
    stack = [by_id[i] for i in keep if i in by_id]
    kept_str = set(stack)
    while stack:
        for pair in parents.get(stack.pop(), []):
            for part in pair:
                if part not in kept_str and part in vocab:
                    kept_str.add(part)
                    keep.add(vocab[part])
                    stack.append(part)
    return sorted(keep)


def _remap_ids(node: Any, old_to_new: dict[int, int]) -> Any:
    """Post-processor templates name special tokens by id ({"id": "<s>", "ids": [1], ...}): remap them."""
    if isinstance(node, dict):
        out = {k: _remap_ids(v, old_to_new) for k, v in node.items()}
        if isinstance(node.get("ids"), list) and "tokens" in node:
            out["ids"] = [old_to_new[i] for i in node["ids"]]
        return out
    if isinstance(node, list):
        return [_remap_ids(v, old_to_new) for v in node]
    return node


def trim_tokenizer(tok: PreTrainedTokenizerFast, kept: Sequence[int]) -> PreTrainedTokenizerFast:
    """A copy of `tok` holding only the `kept` ids (renumbered 0.., order kept), merges filtered in rank
    order, special tokens and post-processor remapped."""
    from transformers import AutoTokenizer

    old_to_new = {old: new for new, old in enumerate(kept)}
    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab = tj["model"]["vocab"]
    new_vocab = {s: old_to_new[i] for s, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in old_to_new}
    merges = tj["model"].get("merges", [])
    tj["model"]["merges"] = [
        m for m, (a, b) in zip(merges, _merge_pairs(merges), strict=True) if a + b in new_vocab
    ]
    tj["model"]["vocab"] = new_vocab
    tj["added_tokens"] = [
        {**a, "id": old_to_new[a["id"]]} for a in tj.get("added_tokens", []) if a["id"] in old_to_new
    ]
    if tj.get("post_processor"):
        tj["post_processor"] = _remap_ids(tj["post_processor"], old_to_new)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        decoder = cfg.get("added_tokens_decoder") or {}
        cfg["added_tokens_decoder"] = {
            str(old_to_new[int(i)]): v for i, v in decoder.items() if int(i) in old_to_new
        }
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        trimmed = AutoTokenizer.from_pretrained(tmp)
    trimmed.chat_template = tok.chat_template
    return trimmed


def trim_model(model: LlamaForCausalLM, kept: Sequence[int]) -> LlamaForCausalLM:
    """Keep the embedding (and untied lm_head) rows of `kept`, in that order; in place."""
    import torch

    idx = torch.tensor(list(kept), dtype=torch.long)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    old_in = model.model.embed_tokens.weight.data
    emb = torch.nn.Embedding(len(idx), old_in.shape[1], dtype=old_in.dtype)
    emb.weight.data = old_in[idx].clone()
    old_out = model.lm_head.weight.data
    model.model.embed_tokens = emb
    if tied:
        model.lm_head.weight = emb.weight
    else:
        head = torch.nn.Linear(old_out.shape[1], len(idx), bias=False, dtype=old_out.dtype)
        head.weight.data = old_out[idx].clone()
        model.lm_head = head
    model.config.vocab_size = len(idx)
    return model


def trim_vocab(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, texts: Iterable[str]
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, list[int]]:
    """(model, tokenizer, kept old ids) restricted to the tokens `texts` need; see kept_token_ids."""
    kept = kept_token_ids(tok, texts)
    new_tok = trim_tokenizer(tok, kept)
    model = trim_model(model, kept)
    for key in ("bos", "eos", "pad"):
        setattr(model.config, f"{key}_token_id", getattr(new_tok, f"{key}_token_id"))
    log.info("vocabulary trimmed: %d -> %d tokens", len(tok), len(kept))
    return model, new_tok, kept


# ---- importance and pruning ----------------------------------------------------------------------------


def _batches(tok: PreTrainedTokenizerFast, texts: Sequence[str], batch_size: int, max_len: int):
    tok.padding_side = "right"
    for i in range(0, len(texts), batch_size):
        yield tok(
            list(texts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_len,
        )


def _calibrate(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    register: Callable[[int, Any, dict], Any],
    batch_size: int,
    max_len: int,
) -> None:
    """Run `texts` through `model` with one hook per decoder layer, ``register(i, layer, state)`` -> handle.
    state["mask"] is the batch's (B, T) float attention mask, so hooks can ignore padding."""
    import torch

    check(len(texts) > 0, "calibration needs at least one text")
    state: dict[str, Any] = {}
    handles = [register(i, layer, state) for i, layer in enumerate(model.model.layers)]
    try:
        model.eval()
        with torch.no_grad():
            for enc in _batches(tok, texts, batch_size, max_len):
                state["mask"] = enc["attention_mask"].float()  # (B, T)
                model(**enc, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def layer_importance(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    batch_size: int = 8,
    max_len: int = 256,
) -> list[float]:
    """Mean angular distance arccos(cos(h_in, h_out)) / pi between each decoder layer's input and output
    hidden states over the real tokens of `texts` (Gromov et al. 2024, one layer at a time): a layer
    that barely turns the residual stream is the cheapest to drop."""
    import torch

    sums = [0.0] * len(model.model.layers)
    count = [0.0]

    def register(i: int, layer: Any, state: dict) -> Any:
        def hook(_mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
            h_out = out[0] if isinstance(out, tuple) else out  # (B, T, C)
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
            sums[i] += float((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi * state["mask"]).sum())
            count[0] += float(state["mask"].sum()) if i == 0 else 0.0

        return layer.register_forward_hook(hook, with_kwargs=True)

    _calibrate(model, tok, texts, register, batch_size, max_len)
    return [s / max(count[0], 1.0) for s in sums]


def select_layers(importance: Sequence[float], keep: int) -> list[int]:
    """The first and last layer, plus the keep - 2 middle layers of largest importance, in order."""
    n = len(importance)
    check(2 <= keep <= n, f"keep_layers={keep}: must be between 2 and the model's {n} layers")
    middle = sorted(range(1, n - 1), key=lambda i: importance[i], reverse=True)[: keep - 2]
    return sorted({0, n - 1, *middle})


def keep_layers(model: LlamaForCausalLM, idx: Sequence[int]) -> LlamaForCausalLM:
    """Keep decoder layers `idx` (in order); in place."""
    import torch

    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in idx)
    for new_i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_i  # the KV cache is indexed by position in the list
    model.config.num_hidden_layers = len(idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    return model


def mlp_importance(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    batch_size: int = 8,
    max_len: int = 256,
    by_write: bool = True,
) -> list[Any]:
    """Per layer, each MLP channel's mean |act(gate(x)) * up(x)| over real tokens times the norm of its
    down-projection column: what the channel writes into the residual stream (by_write=False: activation
    alone, as Minitron ranks). With the column norm, SmolLM2 cut to 768 of 1536 channels kept 44.5% held-out
    accuracy before any recovery against 36.5% (200 questions, answer mode, 64 calibration texts;
    benchmarks/bench_prune.py)."""
    import torch

    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in model.model.layers]

    def register(i: int, layer: Any, state: dict) -> Any:
        def hook(_mod, args):
            act = args[0].float().abs()  # (B, T, I): the down projection's input
            sums[i] += (act * state["mask"].unsqueeze(-1)).sum((0, 1))

        return layer.mlp.down_proj.register_forward_pre_hook(hook)

    _calibrate(model, tok, texts, register, batch_size, max_len)
    if not by_write:
        return sums
    return [
        s * layer.mlp.down_proj.weight.detach().float().norm(dim=0)
        for s, layer in zip(sums, model.model.layers, strict=True)
    ]


def prune_mlp(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    intermediate_size: int,
    by_write: bool = True,
) -> LlamaForCausalLM:
    """Keep the `intermediate_size` MLP channels of every layer that write most into the residual stream
    (mlp_importance; one size for all layers, as the llama config requires); in place."""
    import torch

    current = model.config.intermediate_size
    check(
        0 < intermediate_size <= current,
        f"intermediate_size={intermediate_size}: must be in 1..{current} (the model's MLP width)",
    )
    if intermediate_size == current:
        return model
    for layer, score in zip(
        model.model.layers, mlp_importance(model, tok, texts, by_write=by_write), strict=True
    ):
        idx = torch.topk(score, intermediate_size).indices.sort().values
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, intermediate_size, bias=False, dtype=old.weight.dtype)
            new.weight.data = old.weight.data[idx].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(intermediate_size, old.out_features, bias=False, dtype=old.weight.dtype)
        new.weight.data = old.weight.data[:, idx].clone()
        mlp.down_proj = new
        mlp.intermediate_size = intermediate_size
    model.config.intermediate_size = intermediate_size
    return model


# ---- the stage -----------------------------------------------------------------------------------------


RECOVERY_OBJECTIVES = ("off-policy", "on-policy", "mix")


@dataclass
class CompressConfig:
    """`nestling compress`: a compact student from a trained one."""

    run: str = field(default="runs/default", metadata={"help": "run directory holding traces/ and students/"})
    source: str = field(
        default="smollm2", metadata={"help": "student under RUN/students to compress (its KD teacher too)"}
    )
    name: str | None = field(
        default=None,
        metadata={"help": "compact student's name (default: SOURCE[-cK][-wN], SOURCE-compact if neither)"},
    )
    keep_layers: int | None = field(
        default=None,
        metadata={"help": "decoder layers kept, by angular distance (first and last always; default: all)"},
    )
    intermediate_size: int | None = field(
        default=None,
        metadata={"help": "MLP channels kept per layer, by activation x down-projection norm (default: all)"},
    )
    calib: int = field(default=64, metadata={"help": "training texts used to measure importance"})
    fresh: int = field(
        default=400,
        metadata={"help": "fresh training questions the source answers (verified) for KD; never held-out"},
    )
    vocab_questions: int = field(
        default=2000, metadata={"help": "task questions drawn to cover the task's vocabulary"}
    )
    # Measured on a 200-question held-out split, SmolLM2 cut to 768 MLP channels (held-out accuracy, explain /
    # answer-only): 600 steps at 3e-4 with KD weight 0.5: 68.0 / 67.0%; 300 at 3e-4, 0.9: 69.0 / 65.0%;
    # 600 at 1e-4, 0.9: 71.0 / 67.5%; 300 at 1e-4, 0.9: 72.5 / 69.0%. The recovery set is a few hundred rows:
    # a gentle, short schedule that leans on the source's soft targets forgets least.
    recover_steps: int = field(default=300, metadata={"help": "recovery optimizer steps (0 = none)"})
    lr: float = field(default=1e-4, metadata={"help": "recovery peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "recovery examples per step"})
    kd_alpha: float = field(
        default=0.9, metadata={"help": "weight of the KL to the trimmed source's logits (rest: CE)"}
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature for KD"})
    objective: str = field(
        default="off-policy",
        metadata={
            "help": "recovery: off-policy (KD/CE on fixed rationales) | on-policy (the student samples, the "
            "trimmed source scores every token: GKD) | mix (--lmbda of the steps on-policy)",
            "choices": RECOVERY_OBJECTIVES,
        },
    )
    lmbda: float = field(default=0.5, metadata={"help": "--objective mix: share of on-policy steps"})
    beta: float = field(
        default=0.5, metadata={"help": "on-policy generalized JSD: 0 = forward KL, 1 = reverse KL"}
    )
    temperature: float = field(default=1.0, metadata={"help": "temperature of the student's samples"})
    kd_top_k: int = field(
        default=0, metadata={"help": "on-policy: the source's top-k tokens only (0 = full distribution)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for fresh questions and recovery"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default min(2, cores))"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check(
            self.keep_layers is None or self.keep_layers >= 2,
            f"--keep-layers {self.keep_layers}: must be >= 2",
        )
        check(
            self.intermediate_size is None or self.intermediate_size > 0,
            f"--intermediate-size {self.intermediate_size}: must be > 0",
        )
        check(self.calib > 0, f"--calib {self.calib}: must be > 0")
        check(self.fresh >= 0, f"--fresh {self.fresh}: must be >= 0")
        check(self.vocab_questions >= 0, f"--vocab-questions {self.vocab_questions}: must be >= 0")
        check(self.recover_steps >= 0, f"--recover-steps {self.recover_steps}: must be >= 0")
        check(self.lr > 0, f"--lr {self.lr}: must be > 0")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(0.0 <= self.kd_alpha <= 1.0, f"--kd-alpha {self.kd_alpha}: must be in [0, 1]")
        check(
            self.objective in RECOVERY_OBJECTIVES,
            f"--objective {self.objective!r}: use one of {', '.join(RECOVERY_OBJECTIVES)}",
        )
        check(0.0 < self.lmbda < 1.0, f"--lmbda {self.lmbda}: must be in (0, 1); see --objective")
        check(0.0 <= self.beta <= 1.0, f"--beta {self.beta}: must be in [0, 1]")
        check(self.temperature > 0, f"--temperature {self.temperature}: must be > 0")
        check(self.kd_top_k >= 0, f"--kd-top-k {self.kd_top_k}: must be >= 0")
        if self.name is None:
            width = f"-w{self.intermediate_size}" if self.intermediate_size else ""
            depth = f"-c{self.keep_layers}" if self.keep_layers else ""
            self.name = f"{self.source}{depth}{width}" if depth or width else f"{self.source}-compact"

    def recipe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("run", "threads", "progress")}

    def onpolicy_share(self) -> float:
        """GKD's lambda for the recovery run: 0, 1 or --lmbda."""
        return {"off-policy": 0.0, "on-policy": 1.0}.get(self.objective, self.lmbda)


def _held_keys(questions: list[dict]) -> set[str]:
    """Normalised question texts and expressions of the held-out split: a fresh question matching either
    is refused (the same sum asked in other words is still a held-out question)."""
    from nestling.distill.tasks import normalize_question

    keys = set()
    for r in questions:
        if r.get("split") == "heldout":
            keys.add(normalize_question(r["question"]))
            expr = (r.get("meta") or {}).get("expression")
            if isinstance(expr, str):
                keys.add("expr:" + " ".join(expr.split()))
    return keys


def draw_fresh(task_spec: str, questions: list[dict], n: int, seed: int) -> list[Any]:
    """Up to n task questions that are not in the run (train or held-out) and share no expression with a
    held-out question; drawn with a seed the run never used."""
    from nestling.distill.tasks import load_task, normalize_question

    if n == 0:
        return []
    held = _held_keys(questions)
    seen = {normalize_question(r["question"]) for r in questions}
    out = []
    for ex in load_task(task_spec).examples(4 * n, seed=seed + 7919):
        expr = ex.meta.get("expression")
        key = normalize_question(ex.question)
        if key in seen or key in held or (isinstance(expr, str) and "expr:" + " ".join(expr.split()) in held):
            continue
        seen.add(key)
        ex.id = f"fresh{len(out):06d}"
        out.append(ex)
        if len(out) == n:
            break
    return out


def task_texts(rows: list[dict], questions: list[Any]) -> list[str]:
    """What the student reads and writes on this task: both prompt modes and targets of every verified
    row, and both prompts (+ gold answer) of `questions`."""
    texts = []
    for r in rows:
        texts.append(student_prompt(r["question"]) + explain_target(list(r["steps"]), str(r["answer"])))
        texts.append(student_prompt(r["question"], explain=False) + answer_target(str(r["answer"])))
    for ex in questions:
        texts.append(student_prompt(ex.question))
        texts.append(student_prompt(ex.question, explain=False) + answer_target(str(ex.gold or "")))
    return texts


def calibration_texts(rows: list[dict], n: int) -> list[str]:
    """n task texts spread evenly over the verified rows (both modes), what importance is measured on."""
    return task_texts(rows, [])[:: max(1, 2 * len(rows) // n)][:n]


def fresh_rows(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, examples: list, progress: bool
) -> tuple:
    """The source answers fresh questions greedily in explain mode; the same filters as the traces stage
    keep the rows with a right answer and no false step. Returns (kept rows, filter stats)."""
    from nestling.distill.evaluate import generate
    from nestling.distill.filters import filter_traces

    from nestling.core.explain import extract_answer

    if not examples:
        return [], {}
    prompts = [student_prompt(ex.question) for ex in examples]
    texts, counts, _ = generate(model, tok, prompts, 96, 32, "fresh rationales", progress)
    records = []
    for ex, text, n in zip(examples, texts, counts, strict=True):
        answer = extract_answer(text)
        records.append(
            {
                "id": ex.id + ":0",
                "qid": ex.id,
                "task": ex.task,
                "rationale": text,
                "answer": answer,
                "correct": answer is not None and bool(_score(ex, answer)),
                "truncated": n >= 96,
            }
        )
    kept, stats = filter_traces(records, examples)
    for r in kept:
        r["source"] = "fresh"
    return kept, stats


_SCORER = None  # a TaskScorer, built on first use (its tasks load lazily)


def _score(ex: Any, answer: str) -> bool:
    from nestling.distill.tasks import TaskScorer

    global _SCORER
    _SCORER = _SCORER or TaskScorer()
    return _SCORER.score_example(ex, answer)


def _source_inputs(run: Path, source: str) -> dict[str, Any]:
    from nestling.distill.train import fingerprint_inputs

    from nestling.core.manifest import try_read_manifest

    m = try_read_manifest(RunDir(run).student(source)) or {}
    return {"source": m.get("files", {}), "traces": fingerprint_inputs(run)}


def _publish(model: Any, tok: Any, out: Path, **manifest: Any) -> Path:
    """out/model replaced whole (checkpoint.save_model_dir), then its manifest: never half-written."""
    from nestling.distill.checkpoint import save_model_dir

    save_model_dir(out / "model", model, tok)
    write_manifest(out, stage="compress", files=["model"], **manifest)
    return out / "model"


def trim_name(source: str) -> str:
    """The name a source's lossless trim is published under (the compact student's KD teacher)."""
    return f"{source}-trim"


def compress(cfg: CompressConfig) -> Path:
    """trim -> prune -> recover; returns RUN/students/<name>. Re-running with the same inputs skips."""
    from nestling.distill.accel import set_threads
    from nestling.distill.students import count_params, load_student

    run = Path(cfg.run)
    out = RunDir(run).student(str(cfg.name))
    inputs = _source_inputs(run, cfg.source)
    if is_fresh(out, "compress", cfg.recipe(), inputs):
        log.info("%s is up to date; skipping", out)
        return out
    set_threads(cfg.threads)
    model, tok = load_student(RunDir(run).student(cfg.source) / "model")
    teacher_params = count_params(model)
    data = _Data.load(run, cfg)
    model, tok, trim_dir, kept = _trim(model, tok, run, cfg, data, inputs)
    rec_run = _recovery_run(model, tok, run, cfg, data)
    model, layers, scores = _prune(model, tok, cfg, data.rows, rec_run / "init")
    params = count_params(model)
    log.info("compact %s: layers %s, %.2fM parameters (%.2fx)", cfg.name, layers, params / 1e6,
             params / teacher_params)  # fmt: skip
    metrics: dict[str, Any] = {}
    if cfg.recover_steps:
        model, tok, metrics = _recover(rec_run, trim_dir, cfg)
    metrics = {
        "params": params,
        "teacher_params": teacher_params,
        "param_ratio": round(params / teacher_params, 4),
        "vocab": len(kept),
        "layers_kept": layers,
        "layer_importance": [round(s, 5) for s in scores],
        "fresh_questions": len(data.drawn[: cfg.fresh]),
        "fresh_rows": data.fresh_rows,
        "fresh_filters": data.fresh_filters,
        "train_rows": len(data.rows),
        "recovery": metrics,
    }
    return _publish(model, tok, out, config=cfg.recipe(), inputs=inputs, metrics=metrics).parent


@dataclass
class _Data:
    """What the stages read from the run: questions, verified rows, the task, and fresh questions."""

    questions: list[dict]
    rows: list[dict]
    task: str
    drawn: list[Any]
    train_qs: list[Any]
    fresh_rows: int = 0
    fresh_filters: Any = None

    @classmethod
    def load(cls, run: Path, cfg: CompressConfig) -> _Data:
        from nestling.distill.evaluate import traces_config
        from nestling.distill.tasks import Example
        from nestling.distill.train import training_rows

        questions = RunDir(run).questions()
        task = str(traces_config(run).get("task") or questions[0]["task"])
        return cls(
            questions=questions,
            rows=training_rows(run),
            task=task,
            drawn=draw_fresh(task, questions, cfg.fresh + cfg.vocab_questions, cfg.seed),
            train_qs=[Example.from_row(r) for r in questions if r.get("split") == "train"],
        )


def _trim(
    model: Any, tok: Any, run: Path, cfg: CompressConfig, data: _Data, inputs: dict[str, Any]
) -> tuple[Any, Any, Path, list[int]]:
    """Lossless on task text, so the trimmed source is the compact student's KD teacher."""
    from nestling.distill.students import count_params

    model, tok, kept = trim_vocab(model, tok, task_texts(data.rows, data.train_qs + data.drawn))
    trim_dir = _publish(
        model,
        tok,
        RunDir(run).student(trim_name(cfg.source)),
        config={"source": cfg.source, "vocab_questions": cfg.vocab_questions},
        inputs=inputs,
        metrics={"params": count_params(model), "vocab": len(kept)},
    )
    return model, tok, trim_dir, kept


def _recovery_run(model: Any, tok: Any, run: Path, cfg: CompressConfig, data: _Data) -> Path:
    """RUN/compress/<name>: the run's questions and verified rows plus fresh verified rows (KD targets on
    questions the run never drew)."""
    fresh, stats = fresh_rows(model, tok, data.drawn[: cfg.fresh], cfg.progress)
    data.fresh_rows, data.fresh_filters = len(fresh), stats.get("filters")
    rec_run = run / "compress" / str(cfg.name)
    shutil.copyfile(RunDir(run).questions_file, _mkparent(RunDir(rec_run).questions_file))
    write_jsonl(RunDir(rec_run).kept_file, read_jsonl(RunDir(run).kept_file) + fresh)
    return rec_run


def _prune(
    model: Any, tok: Any, cfg: CompressConfig, rows: list[dict], init_dir: Path
) -> tuple[Any, list[int], list[float]]:
    """Depth (and optionally width) by measured importance; the pruned model is saved as recovery's init."""
    from nestling.distill.students import save_student

    calib = calibration_texts(rows, cfg.calib)
    layers, scores = list(range(model.config.num_hidden_layers)), []
    if cfg.keep_layers is not None:  # a calibration pass only where depth is cut
        scores = layer_importance(model, tok, calib)
        layers = select_layers(scores, cfg.keep_layers)
        model = keep_layers(model, layers)
    if cfg.intermediate_size:
        model = prune_mlp(model, tok, calib, cfg.intermediate_size)
    shutil.rmtree(init_dir, ignore_errors=True)
    save_student(model, tok, init_dir)
    return model, layers, scores


def _recover(rec_run: Path, trim_dir: Path, cfg: CompressConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Logit KD from the trimmed source plus CE on the verified rows and/or on-policy GKD steps (the student
    samples on training and fresh questions, the trimmed source scores), through distill.train."""
    from nestling.distill.students import load_student
    from nestling.distill.train import TrainConfig, train

    tcfg = TrainConfig(
        run=str(rec_run),
        student=f"{cfg.name}=hf:{(rec_run / 'init').resolve()}",
        steps=cfg.recover_steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        warmup=min(30, cfg.recover_steps // 10),
        kd_alpha=cfg.kd_alpha,
        kd_teacher=f"hf:{trim_dir.resolve()}",
        kd_temperature=cfg.kd_temperature,
        lmbda=cfg.onpolicy_share(),
        beta=cfg.beta,
        sample_temperature=cfg.temperature,
        kd_top_k=cfg.kd_top_k,
        onpolicy_fresh=cfg.fresh if cfg.objective != "off-policy" else 0,
        seed=cfg.seed,
        threads=cfg.threads,
        progress=cfg.progress,
    )
    trained = train(tcfg)
    metrics = read_manifest(trained).get("metrics", {})
    model, tok = load_student(trained / "model")
    return model, tok, metrics


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
