"""Vocabulary surgery: a tokenizer and model cut down to the tokens a task's text needs, losslessly.

    model, tok, kept = trim_vocab(model, tok, texts)   # tokenization of `texts` is unchanged
    kept = kept_token_ids(tok, texts)                   # the ids a trim must keep (merge closure included)

Used by the compress stage (distill/compress.py); the trimmed tokenizer is an ordinary byte-level BPE that
export and serve read as they are.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestling.core.errors import NestlingError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)


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
