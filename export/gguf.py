"""GGUF export: our own writer on the ``gguf`` package, then llama.cpp's quantizer through llama-cpp-python.

    write_gguf("students/tiny/model", "exports/tiny/gguf/model-f16.gguf")          # f16, norms F32
    quantize_gguf("exports/.../model-f16.gguf", "exports/.../model-q8_0.gguf", "q8_0")

No converter ships with llama-cpp-python or gguf, so this module does what llama.cpp's convert_hf_to_gguf.py
does for every family in ``export.gguf_arch.FAMILIES`` (llama, mistral, qwen2, qwen3, gemma3_text, phi3):
tensor names, token types and file types come from gguf-py's tables, per-family conventions (q/k
permutation, norm offsets, sliding window, hard-coded hyper-parameters) from the one table in gguf_arch, and
the tokenizer is described so that llama.cpp tokenizes exactly like Hugging Face (byte-level BPE as "gpt2"
with its pre-tokenizer name; byte-fallback BPE as sentencepiece-style "llama" with scores; Unigram, what
transformers makes of a Gemma or other sentencepiece GGUF, as "t5" with its log-probabilities). A student
taken from a GGUF (``source_gguf``) gets that file's tokenizer fields where they match its tokenizer.json.
``check_gguf_writable`` proves that on a vocab-only GGUF in about a second, before any artifact is built;
export.parity checks the result again at export time.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from nestling.export.gguf_arch import (
    Family,
    add_space_prefix,
    family_for,
    gguf_model_name,
    metaspace_problem,
    pre_tokenizer_name,
)

from nestling.core.errors import NestlingError
from nestling.core.manifest import read_json, try_read_manifest
from nestling.core.prompting import CHAT_TEMPLATE

log = logging.getLogger(__name__)

QUANT_TYPES: dict[str, gguf.LlamaFileType] = {
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, default={}, fix="the student directory is corrupt; save the student again")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rotary layout (as convert_hf_to_gguf.py).

    For k, n_head is the number of key/value heads (GQA).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def detect_pre_tokenizer(tok_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json (see gguf_arch)."""
    return pre_tokenizer_name(tok_json)


def _is_sentencepiece(tj: dict[str, Any]) -> bool:
    """Byte-fallback BPE over '▁'-escaped text (Gemma, Llama 2, Mistral, Phi-3). Byte-level BPE (a ByteLevel
    pre-tokenizer) may set byte_fallback too (transformers' GGUF tokenizer conversion does): not that."""
    return bool(tj["model"].get("byte_fallback")) and not _byte_level(tj)


def _byte_level(tj: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(tj.get("pre_tokenizer"))


def _refuse_inexact(tok_path: Path, tj: dict[str, Any], spm: bool, pieces: list[str]) -> None:
    """A one-line NestlingError for a tokenizer.json that no GGUF tokenizer reproduces exactly."""
    model = tj["model"]
    if model["type"] == "BPE" and not model.get("byte_fallback") and not _byte_level(tj):
        # What transformers makes of a Phi-3 GGUF: no byte fallback, no normalizer, no pre-tokenizer, so HF
        # drops every character outside the vocabulary, spaces included ("What is" -> "Wh a t i s"). llama.cpp
        # cannot drop text: its SPM escapes spaces as '▁' and falls back to <0xNN> bytes (or aborts without
        # them), its BPE byte-encodes every byte. No GGUF tokenizer reproduces it, even on plain ASCII.
        raise NestlingError(
            f"{tok_path}: BPE with neither byte fallback nor a byte-level pre-tokenizer (what transformers "
            "makes of a Phi-3 GGUF) drops characters outside its vocabulary, which llama.cpp never does; "
            "this tokenizer cannot be written as GGUF exactly"
        )
    if spm and (problem := metaspace_problem(tj, pieces)):
        raise NestlingError(f"{tok_path}: {problem}; this tokenizer cannot be written as GGUF exactly")


def _token_types(
    tokens: list[str | None], tj: dict[str, Any], unk_id: int | None, byte_fallback: bool
) -> list[gguf.TokenType]:
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    user = {a["id"] for a in tj.get("added_tokens", []) if not a.get("special")}
    types = []
    for i, t in enumerate(tokens):
        if t is None:
            types.append(gguf.TokenType.UNUSED)
        elif i == unk_id:  # even when also an added special token, as llama.cpp's converter types it
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        elif i in user:
            types.append(gguf.TokenType.USER_DEFINED)
        elif byte_fallback and _BYTE_TOKEN.fullmatch(t):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def _merge_scores(tokens: list[str], merges: list[Any]) -> list[float]:
    """Sentencepiece-style scores from BPE merge ranks: llama.cpp's "llama" tokenizer merges the adjacent
    pair whose result scores highest, so a token made by merge r scores -r and merges in HF's order."""
    best: dict[str, int] = {}
    for rank, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        best.setdefault(a + b, rank)
    return [-float(best[t]) if t in best else 0.0 for t in tokens]


def _template_ends(post: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """Special tokens HF's post-processor puts before and after a single text (bos, eos), if any."""
    procs = (post or {}).get("processors", [post]) if post else []
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            single = p["single"]
            first = single[0].get("SpecialToken", {}).get("id")
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first, last
    return None, None


def _vocab_of(tj: dict[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    """Token -> id (added tokens included) and, for Unigram, token -> log-probability score."""
    model = tj["model"]
    if model["type"] == "Unigram":
        pieces = model.get("vocab", [])
        vocab, scores = {p: i for i, (p, _) in enumerate(pieces)}, {p: float(x) for p, x in pieces}
    else:
        vocab, scores = dict(model.get("vocab", {})), {}
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab, scores


def _tokenizer_fields(model_dir: Path, vocab_size: int, pre: str | None) -> dict[str, Any]:
    """Tokens, types, scores or merges, and flags for the GGUF, read from tokenizer.json.

    Byte-level BPE -> "gpt2" with its pre-tokenizer name; sentencepiece-style BPE with byte fallback ->
    "llama" (SPM) with merge ranks as scores; Unigram -> "t5" (UGM), llama.cpp's Viterbi over the same
    log-probabilities. A Unigram vocabulary written as "llama" is not the same tokenizer: SPM merges pairs
    greedily and cannot reach a piece whose halves are not pieces (14 of 67 test strings matched, against
    67 of 67 as "t5"). UGM has no byte fallback: a character outside the vocabulary is <unk> in llama.cpp
    where HF emits its bytes, which check_gguf_writable reports before anything is built.
    """
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise NestlingError(f"{model_dir}: no tokenizer.json; save the student with its fast tokenizer")
    tj = _read_json(tok_path)
    model = tj.get("model", {})
    kind = model.get("type")
    if kind not in ("BPE", "Unigram"):
        raise NestlingError(
            f"{tok_path}: {kind} tokenizer; GGUF export supports byte-level BPE, sentencepiece-style BPE "
            "with byte fallback and Unigram"
        )
    vocab, unigram_scores = _vocab_of(tj)
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * n
    for text, i in vocab.items():
        tokens[i] = text
    unigram = kind == "Unigram"
    spm = unigram or _is_sentencepiece(tj)
    unk_id = model.get("unk_id") if unigram else vocab.get(model.get("unk_token") or "")
    _refuse_inexact(tok_path, tj, spm, list(vocab))
    types = _token_types(tokens, tj, unk_id, byte_fallback=spm and bool(model.get("byte_fallback")))
    # The embedding may be padded past the tokenizer: llama.cpp wants a name for every row.
    names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    cfg = _read_json(model_dir / "tokenizer_config.json")
    first, last = _template_ends(tj.get("post_processor"))

    def text_of(key: str) -> str | None:
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    if unigram:
        scores: list[float] | None = [unigram_scores.get(t, 0.0) for t in names]
        if any(float(np.float32(x)) != x for x in unigram_scores.values()):
            # sentencepiece and GGUF hold float32 scores; finer ones may break Viterbi's near-ties otherwise
            log.warning("%s: Unigram scores rounded to float32 for GGUF", tok_path)
    else:
        scores = _merge_scores(names, model.get("merges", [])) if spm else None
    return {
        "model": "t5" if unigram else "llama" if spm else "gpt2",
        "pre": None if spm else (pre or pre_tokenizer_name(tj)),
        "tokens": names,
        "types": types,
        "scores": scores,
        "unk_id": unk_id,
        "charsmap": _precompiled_charsmap(tj) if unigram else None,
        "add_space_prefix": add_space_prefix(tj) if spm else False,
        "name": gguf_model_name(model_dir.parent.name if model_dir.name == "model" else model_dir.name, tj),
        "add_bos": first is not None and first == text_of("bos_token"),
        "add_eos": last is not None and last == text_of("eos_token"),
    }


def source_gguf(model_dir: str | Path) -> Path | None:
    """The GGUF a trained student started from (`nestling train --student gguf:FILE`), as its train manifest
    (RUN/students/NAME/manifest.json) names it; None for any other student or a source no longer there."""
    manifest = try_read_manifest(Path(model_dir).parent, "train")
    source = str(((manifest or {}).get("student") or {}).get("source", ""))
    if not source.startswith("gguf:") or Path(model_dir).name != "model":
        return None
    target = source.removeprefix("gguf:")
    if target == "smollm2":
        from nestling.distill.students import bundled_smollm2

        return bundled_smollm2()
    path = Path(target)
    if not path.is_file():
        log.info("%s: its source %s is not a file here; tokenizer fields derived", model_dir, source)
        return None
    return path


# tokenizer.* fields taken from the source GGUF as they are (tokenizer.ggml.model is always derived: it is
# what reproduces the student's tokenizer.json, e.g. "t5" for the Unigram transformers makes of an SPM GGUF).
CARRIED = {
    "scores": gguf.Keys.Tokenizer.SCORES,
    "types": gguf.Keys.Tokenizer.TOKEN_TYPE,
    "pre": gguf.Keys.Tokenizer.PRE,
    "merges": gguf.Keys.Tokenizer.MERGES,
    "charsmap": gguf.Keys.Tokenizer.PRECOMPILED_CHARSMAP,
}
# Flags and ids HF's tokenizer.json decides: the source must agree with the student's, or nothing is carried.
MUST_AGREE = {
    "add_bos": gguf.Keys.Tokenizer.ADD_BOS,
    "add_eos": gguf.Keys.Tokenizer.ADD_EOS,
    "add_space_prefix": gguf.Keys.Tokenizer.ADD_PREFIX,
}
SPECIAL_IDS = {
    "bos": gguf.Keys.Tokenizer.BOS_ID,
    "eos": gguf.Keys.Tokenizer.EOS_ID,
    "unk": gguf.Keys.Tokenizer.UNK_ID,
}


def _read_tokenizer_kv(path: Path) -> dict[str, Any]:
    """tokenizer.* fields of a GGUF through gguf-py's reader (the file is mapped; no tensor is read)."""
    try:
        fields = gguf.GGUFReader(str(path)).fields
    except Exception as e:  # truncated or not a GGUF
        raise NestlingError(
            f"{path}: not a readable GGUF ({type(e).__name__}); pass its right path"
        ) from None
    return {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.ggml.")}


def _mismatch(kv: dict[str, Any], tokf: dict[str, Any], special: dict[str, int]) -> str | None:
    """Why the source GGUF's tokenizer is not the student's, or None when it is."""
    src = kv.get(gguf.Keys.Tokenizer.LIST) or []
    if len(src) != len(tokf["tokens"]):
        return f"{len(src)} tokens, the student has {len(tokf['tokens'])}"
    if src != tokf["tokens"]:
        i = next(i for i, (a, b) in enumerate(zip(src, tokf["tokens"], strict=True)) if a != b)
        return f"token {i} is {src[i]!r}, the student's is {tokf['tokens'][i]!r}"
    for name, key in SPECIAL_IDS.items():
        if key in kv and kv[key] != special.get(name):
            return f"{name} id {kv[key]}, the student's is {special.get(name)}"
    for name, key in MUST_AGREE.items():
        if key in kv and bool(kv[key]) != tokf[name]:
            return f"{key} {bool(kv[key])}, the student's tokenizer.json says {tokf[name]}"
    return None


def _carry_over(src: Path, tokf: dict[str, Any], special: dict[str, int], pre: str | None) -> dict[str, Any]:
    """`tokf` with the source GGUF's scores, token types, pre, merges and charsmap when its tokens, special
    ids and flags match the student's; `tokf` as derived (and why, logged) otherwise."""
    try:
        kv = _read_tokenizer_kv(src)
    except NestlingError as e:  # the student is complete without it
        log.warning("%s; tokenizer fields derived", e)
        return tokf
    why = _mismatch(kv, tokf, special)
    if why:
        log.info("%s: tokenizer fields derived, not carried over (the source has %s)", src, why)
        return tokf
    # llama.cpp reads pre and merges for BPE ("gpt2") only and the charsmap for UGM ("t5"); --gguf-pre wins.
    skip = {"pre", "merges"} if tokf["model"] != "gpt2" else {"pre"} if pre else set()
    skip |= {"charsmap"} if tokf["model"] != "t5" else set()
    carried = {name: kv[key] for name, key in CARRIED.items() if key in kv and name not in skip}
    if "charsmap" in carried:
        carried["charsmap"] = bytes(carried["charsmap"])
    log.info("tokenizer %s carried over from %s", ", ".join(carried) or "nothing", src)
    return {**tokf, **carried}


def _precompiled_charsmap(tj: dict[str, Any]) -> bytes | None:
    """sentencepiece's normalization table (T5-style tokenizer.json), which llama.cpp's UGM applies as is."""
    norm = tj.get("normalizer") or {}
    for node in [norm, *norm.get("normalizers", [])]:
        if node.get("type") == "Precompiled" and node.get("precompiled_charsmap"):
            return base64.b64decode(node["precompiled_charsmap"])
    return None


def _load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All safetensors shards as float32 numpy (through torch so bf16 checkpoints work too)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise NestlingError(f"{model_dir}: no .safetensors weights (pickled weights are never loaded)")
    out: dict[str, np.ndarray] = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k).float().numpy()
    except Exception as e:
        raise NestlingError(
            f"{model_dir}: cannot read the safetensors weights ({e}); re-save the student"
        ) from None
    return out


class _Shape:
    """The attention geometry of config.json that the writer and the tensor rules need."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.n_layer = int(cfg["num_hidden_layers"])
        self.n_head = int(cfg["num_attention_heads"])
        self.n_kv = int(cfg.get("num_key_value_heads") or self.n_head)
        self.hidden = int(cfg["hidden_size"])
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.n_head)
        self.n_rot = int(self.head_dim * float(cfg.get("partial_rotary_factor", 1.0)))


def _rope_scaling(w: gguf.GGUFWriter, d: Path, cfg: dict[str, Any], fam: Family) -> dict[str, np.ndarray]:
    """Rope scaling metadata; returns the extra tensors it needs (Llama 3's per-frequency factors)."""
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        return {}
    if kind == "llama3" and gguf.MODEL_TENSOR.ROPE_FREQS in gguf.MODEL_TENSORS[fam.arch]:
        # llama.cpp divides each frequency by rope_freqs[i]: the ratio of HF's plain to scaled inv_freq,
        # computed by transformers' own rope function so the two cannot drift apart.
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        conf = AutoConfig.from_pretrained(d)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](conf, "cpu")
        plain, _ = ROPE_INIT_FUNCTIONS["default"](conf, "cpu")
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return {name: (plain / scaled).float().numpy()}
    raise NestlingError(f"{d}: rope_scaling {scaling} is not supported (default, linear, llama3 are)")


def _add_hparams(w: gguf.GGUFWriter, cfg: dict[str, Any], fam: Family, shape: _Shape, dtype: str) -> None:
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_kv)
    w.add_rope_dimension_count(shape.n_rot)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    if fam.sliding_window:
        w.add_sliding_window(int(cfg["sliding_window"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)


def _special_vocab(d: Path, tokf: dict[str, Any]) -> gguf.SpecialVocab:
    """Merges (byte-level BPE), special ids and the chat template, read as llama.cpp's converter does."""
    special = gguf.SpecialVocab(d, load_merges=tokf["model"] == "gpt2", n_vocab=len(tokf["tokens"]))
    gen = _read_json(d / "generation_config.json")
    eos = gen.get("eos_token_id")
    if eos is not None:  # what generate() stops at, when the tokenizer config says otherwise
        special.special_token_ids["eos"] = int(eos[0] if isinstance(eos, list) else eos)
    if tokf["unk_id"] is not None:  # UGM scores unknown characters with it; the model names it by id
        special.special_token_ids["unk"] = int(tokf["unk_id"])
    special.add_special_token = {}  # decided from the post-processor below: what HF's encode() does
    template = special.chat_template if special.chat_template is not None else CHAT_TEMPLATE
    special.chat_template = template
    if tokf["add_bos"] and isinstance(template, str) and "bos_token" not in template:
        # Chat servers tokenize a rendered template without adding bos (llama-cpp-python) or strip a leading
        # one before adding it (llama.cpp): either way the template must start with it, as HF templates do.
        special.chat_template = "{{- bos_token -}}" + special.chat_template
    return special


def _add_tokenizer(w: gguf.GGUFWriter, tokf: dict[str, Any], special: gguf.SpecialVocab) -> None:
    w.add_tokenizer_model(tokf["model"])
    if tokf["pre"]:
        w.add_tokenizer_pre(tokf["pre"])
    w.add_token_list(tokf["tokens"])
    w.add_token_types(tokf["types"])
    if tokf["scores"] is not None:
        w.add_token_scores(tokf["scores"])
    if tokf.get("merges"):  # carried over from a source GGUF
        special.merges = list(tokf["merges"])
    special.add_to_gguf(w, quiet=True)
    if tokf["charsmap"]:
        w.add_precompiled_charsmap(tokf["charsmap"])
    w.add_add_bos_token(tokf["add_bos"])
    w.add_add_eos_token(tokf["add_eos"])
    w.add_add_space_prefix(tokf["add_space_prefix"])


def _convert(hf_name: str, arr: np.ndarray, fam: Family, shape: _Shape) -> np.ndarray:
    """One HF tensor in llama.cpp's convention for `fam` (still float32)."""
    if fam.permute_qk:
        if hf_name.endswith("q_proj.weight"):
            arr = permute_qk(arr, shape.n_head)
        elif hf_name.endswith("k_proj.weight"):
            arr = permute_qk(arr, shape.n_kv)
        elif hf_name.endswith("qkv_proj.weight"):  # fused rows: q | k | v
            q, k = shape.n_head * shape.head_dim, shape.n_kv * shape.head_dim
            arr = np.concatenate(
                [permute_qk(arr[:q], shape.n_head), permute_qk(arr[q : q + k], shape.n_kv), arr[q + k :]]
            )
    if fam.norm_offset and hf_name.endswith("norm.weight"):
        arr = arr + fam.norm_offset
    return arr


def _tensor_names(d: Path, tensors: list[str], cfg: dict[str, Any], fam: Family) -> dict[str, str]:
    """HF tensor name -> llama.cpp name, for every tensor written; NestlingError for one without a name."""
    name_map = gguf.get_tensor_name_map(fam.arch, int(cfg["num_hidden_layers"]))
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors
    out = {}
    for hf_name in tensors:
        if (hf_name == "lm_head.weight" and tied) or hf_name.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reuses token_embd for the output when output.weight is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise NestlingError(f"{d}: tensor {hf_name!r} has no llama.cpp name for {cfg['model_type']}")
        out[hf_name] = name
    return out


def _safetensors_keys(d: Path) -> list[str]:
    """Tensor names from the safetensors headers alone (no weights read)."""
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise NestlingError(f"{d}: no .safetensors weights (pickled weights are never loaded)")
    keys: list[str] = []
    try:
        for f in files:
            with safe_open(str(f), framework="np") as st:
                keys += list(st.keys())
    except Exception as e:
        raise NestlingError(f"{d}: cannot load the student's weights ({e}); re-save the student") from None
    return keys


def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    dtype: str = "f16",
    pre: str | None = None,
    vocab_only: bool = False,
    source: str | Path | None = None,
) -> Path:
    """Write a student of any family in gguf_arch.FAMILIES as GGUF (f16 or f32; 1-D tensors always F32).

    vocab_only=True writes the metadata and tokenizer without tensors: what llama.cpp's vocab_only
    loader needs, in about a second whatever the model's size (check_gguf_writable).
    source: the GGUF the student came from (source_gguf); its tokenizer fields are written when they match.
    """
    src = Path(source) if source is not None else None
    return _write(Path(model_dir), Path(out_path), dtype, pre, vocab_only, src)[0]


def _write(
    d: Path, out: Path, dtype: str, pre: str | None, vocab_only: bool, source: Path | None = None
) -> tuple[Path, str]:
    """write_gguf; also returns the tokenizer model written ("gpt2", "llama" or "t5")."""
    if dtype not in ("f16", "f32"):
        raise NestlingError(f"GGUF base dtype {dtype!r}: use f16 or f32")
    cfg = _read_json(d / "config.json")
    fam = family_for(cfg, d)
    shape = _Shape(cfg)
    tokf = _tokenizer_fields(d, int(cfg["vocab_size"]), pre)
    special = _special_vocab(d, tokf)
    if source is not None:
        tokf = _carry_over(source, tokf, special.special_token_ids, pre)
    tensors = {} if vocab_only else _load_tensors(d)
    names = _tensor_names(d, list(tensors), cfg, fam)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines repeat what we log below
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[fam.arch])
    try:
        w.add_name(tokf["name"] or "student")
        _add_hparams(w, cfg, fam, shape, dtype)
        extra = {} if vocab_only else _rope_scaling(w, d, cfg, fam)
        w.add_vocab_size(len(tokf["tokens"]))
        _add_tokenizer(w, tokf, special)
        for hf_name, name in names.items():
            arr = _convert(hf_name, tensors[hf_name], fam, shape)
            # Norms and biases (1-D) stay F32: llama.cpp expects it and they cost nothing.
            w.add_tensor(name, arr.astype(np.float16 if dtype == "f16" and arr.ndim > 1 else np.float32))
        for name, arr in extra.items():
            w.add_tensor(name, arr.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info(
        "wrote %s (%s, %d tensors, tokenizer %s/%s, add_bos=%s)",
        out,
        cfg["model_type"],
        len(names) + len(extra),
        tokf["model"],
        tokf["pre"],
        tokf["add_bos"],
    )
    return out, tokf["model"]


def check_student_weights(model_dir: str | Path) -> None:
    """The safetensors headers are readable (a corrupt student fails every variant, not only GGUF)."""
    _safetensors_keys(Path(model_dir))


def check_gguf_writable(
    model_dir: str | Path, pre: str | None = None, texts: Sequence[str] = (), source: str | Path | None = None
) -> str:
    """Everything write_gguf would refuse, found in about a second and before any artifact: the family
    and its config, every tensor's llama.cpp name, rope scaling, and the tokenizer, which llama.cpp must
    tokenize exactly like HF on the export's probe strings (and `texts`). Returns the tokenizer model
    ("gpt2", "llama" or "t5"); raises a one-line NestlingError otherwise."""
    d = Path(model_dir)
    cfg = _read_json(d / "config.json")
    fam = family_for(cfg, d)
    _tensor_names(d, _safetensors_keys(d), cfg, fam)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "linear", "llama3"):
        raise NestlingError(f"{d}: rope_scaling {scaling} is not supported (default, linear, llama3 are)")
    with tempfile.TemporaryDirectory(prefix="nestling-vocab-") as tmp:
        src = Path(source) if source is not None else None
        path, model = _write(d, Path(tmp) / "vocab.gguf", "f16", pre, vocab_only=True, source=src)
        _compare_tokenization(d, path, model, list(texts))
    return model


def _compare_tokenization(d: Path, path: Path, model: str, texts: list[str]) -> None:
    import llama_cpp
    from nestling.export.parity import TOKENIZATION_PROBES
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        ends = [s for s in (tok.eos_token, tok.bos_token) if s]  # special tokens inside text
        specials = [t + s + " after" for s in ends for t in TOKENIZATION_PROBES[:2]]
        for text in [*TOKENIZATION_PROBES, *specials, *texts]:
            hf = tok(text)["input_ids"]
            cpp = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
            if hf != cpp:
                at = 0
                while at < min(len(hf), len(cpp)) and hf[at] == cpp[at]:
                    at += 1
                raise NestlingError(
                    f"{d}: llama.cpp ({model!r} tokenizer) would tokenize {text!r} unlike Hugging Face "
                    f"(from token {at}: {cpp[at : at + 4]} vs {hf[at : at + 4]}); this tokenizer cannot "
                    "be written as GGUF exactly"
                )
    finally:
        llm.close()


@contextlib.contextmanager
def _stderr_to_log(what: str) -> Iterator[None]:
    """Route C-level stderr (llama.cpp's quantizer prints one "falling back" line per tensor whose rows are
    not a multiple of 256: 180 of SmolLM2's 272) into this module's DEBUG log, with a one-line summary."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode("utf-8", errors="replace").splitlines()
    fallbacks = sum("falling back" in ln for ln in lines)
    log.debug("%s:\n%s", what, "\n".join(lines))
    if fallbacks:
        log.info("%s: %d tensors fell back to another type (rows not a multiple of 256)", what, fallbacks)


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, n_threads: int = 1) -> Path:
    """llama.cpp's own quantizer via ctypes (< 1 s for a tiny student)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # the quantizer logs every tensor to stderr otherwise
    if qtype not in QUANT_TYPES:
        raise NestlingError(f"GGUF quant type {qtype!r}: choose one of {', '.join(QUANT_TYPES)}")
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QUANT_TYPES[qtype])
    params.nthread = n_threads
    with _stderr_to_log(f"llama.cpp quantize {qtype}"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise NestlingError(
            f"llama.cpp could not quantize {src} to {qtype} (code {rc}); is the f16 GGUF valid?"
        )
    os.replace(tmp, dst)
    return dst
