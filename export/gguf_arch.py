"""What llama.cpp's loader expects of each Hugging Face family, in one table (read by export.gguf).

    fam = family_for(cfg)                 # cfg: config.json as a dict; NestlingError when unsupported
    fam.arch                              # gguf.MODEL_ARCH.QWEN2; tensor names come from gguf-py's map
    pre_tokenizer_name(tokenizer_json)    # "qwen2", "llama-bpe", "smollm", "gpt-2", ... or NestlingError

Facts taken from llama.cpp's own converter (convert_hf_to_gguf.py) and loader (src/llama-model.cpp,
src/llama-vocab.cpp): which families use the interleaved ("NORM") rotary layout that needs HF's q/k rows
permuted, which add 1 to RMSNorm weights, which hyper-parameters the loader hard-codes instead of reading.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf

from nestling.core.errors import NestlingError


def _gemma3_fixed(cfg: dict[str, Any]) -> list[str]:
    """Gemma 3 values llama.cpp hard-codes (llama-model.cpp, LLM_ARCH_GEMMA3) rather than reads."""
    n = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    problems = []
    # Every 6th layer global, the rest sliding: set_swa_pattern(6).
    want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if cfg.get("layer_types") and list(cfg["layer_types"]) != want:
        problems.append(f"layer_types {cfg['layer_types']} (llama.cpp assumes every 6th layer global)")
    if float(cfg.get("rope_local_base_freq", 10000.0)) != 10000.0:
        problems.append(f"rope_local_base_freq {cfg['rope_local_base_freq']} (llama.cpp uses 10000)")
    # Attention is scaled by 1/sqrt(head_dim) (the 27B's n_embd/n_head case aside).
    if int(cfg.get("query_pre_attn_scalar") or head_dim) != head_dim:
        problems.append(f"query_pre_attn_scalar {cfg['query_pre_attn_scalar']} != head_dim {head_dim}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key):
            problems.append(f"{key} {cfg[key]} (llama.cpp's gemma3 graph has none)")
    return problems


def _no_sliding_window(cfg: dict[str, Any]) -> list[str]:
    """Qwen2/3 sliding attention is not built by llama.cpp's qwen2/qwen3 graphs."""
    if cfg.get("use_sliding_window"):
        return [f"use_sliding_window with window {cfg.get('sliding_window')} (llama.cpp attends fully)"]
    return []


def _none(cfg: dict[str, Any]) -> list[str]:
    return []


@dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` becomes a GGUF llama.cpp loads and computes identically."""

    arch: gguf.MODEL_ARCH
    # llama.cpp's LLAMA arch rotates interleaved pairs (rope type NORM): its converter permutes HF's
    # rotate-half q/k rows. NEOX-rope archs (qwen2, qwen3, gemma3, phi3) take HF's layout as it is.
    permute_qk: bool = False
    # HF Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so its converter stores w + 1.
    norm_offset: float = 0.0
    # llama.cpp reads %s.attention.sliding_window (Gemma 3 requires it).
    sliding_window: bool = False
    # Config values llama.cpp cannot express for this arch: a non-empty list refuses the export.
    unsupported: Callable[[dict[str, Any]], list[str]] = field(default=_none)


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    # convert_hf_to_gguf.py writes Mistral (v0.1-0.3) as the llama arch, permutation included.
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    # q/k/v biases need no rule: gguf-py's map names them attn_{q,k,v}.bias and the loader reads them.
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, unsupported=_no_sliding_window),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3, unsupported=_no_sliding_window),
    # The embedding scale sqrt(hidden) is applied by llama.cpp's gemma3 graph, never stored.
    "gemma3_text": Family(
        gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0, sliding_window=True, unsupported=_gemma3_fixed
    ),
    # llama.cpp's phi3 loader takes the fused qkv_proj as attn_qkv and gate_up_proj as a 2x-wide ffn_up
    # (its SwiGLU splits gate | up in HF's order), so fused tensors are written as they are.
    "phi3": Family(gguf.MODEL_ARCH.PHI3),
}


def family_for(cfg: dict[str, Any], where: object = "model") -> Family:
    """The table entry for config.json `cfg`, or a NestlingError naming the supported families."""
    model_type = cfg.get("model_type")
    fam = FAMILIES.get(str(model_type))
    if fam is None:
        raise NestlingError(
            f"{where}: model_type {model_type!r} has no GGUF rules; supported: {', '.join(FAMILIES)}"
        )
    problems = fam.unsupported(cfg)
    if problems:
        raise NestlingError(f"{where}: llama.cpp cannot reproduce {model_type} with {'; '.join(problems)}")
    return fam


# llama.cpp's tokenizer.ggml.pre names for byte-level BPE tokenizers that split with a regex first
# (src/llama-vocab.cpp holds the same regexes). A wrong name silently changes how text is split.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_PRE: dict[str, str] = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json, or NestlingError.

    ByteLevel alone is GPT-2's regex ("gpt-2"); digits split one by one before ByteLevel is SmolLM2's
    ("smollm"); a Split by a known regex before a regex-free ByteLevel is Llama 3's or Qwen2's.
    """
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = SPLIT_REGEX_PRE.get((parts[0].get("pattern") or {}).get("Regex", ""))
        if name and parts[0].get("behavior") == "Isolated":
            return name
    raise NestlingError(
        f"pre-tokenizer {types} is not one llama.cpp is known to reproduce; use a byte-level BPE "
        "tokenizer (distill.students.train_tokenizer) or pass the llama.cpp name with --gguf-pre"
    )


def _tokenizer_nodes(tok_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Every normalizer and pre-tokenizer step of a tokenizer.json, Sequences flattened."""

    def walk(node: Any) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        subs = node.get("normalizers") or node.get("pretokenizers") or []
        return [node, *(n for s in subs for n in walk(s))]

    return walk(tok_json.get("normalizer")) + walk(tok_json.get("pre_tokenizer"))


def _prepend_scheme(node: dict[str, Any]) -> str:
    """A Metaspace's prepend_scheme; tokenizers < 0.15 wrote add_prefix_space (true = "always")."""
    if "prepend_scheme" in node:
        return str(node["prepend_scheme"])
    return "always" if node.get("add_prefix_space", True) else "never"


def add_space_prefix(tok_json: dict[str, Any]) -> bool:
    """Does a byte-fallback (sentencepiece-style) tokenizer prepend '▁' to the text (llama 2, Mistral, Phi-3
    do; Gemma does not)? llama.cpp's add_space_prefix prepends it at the start and after each special token,
    as HF's Prepend normalizer does per segment. A Metaspace that prepends is refused by metaspace_problem."""
    return any(
        (n.get("type") == "Prepend" and n.get("prepend") == "▁")
        or (n.get("type") == "Metaspace" and _prepend_scheme(n) != "never")
        for n in _tokenizer_nodes(tok_json)
    )


def metaspace_problem(tok_json: dict[str, Any], pieces: list[str]) -> str | None:
    """Why llama.cpp cannot reproduce this tokenizer's Metaspace pre-tokenizer, or None.

    Measured on SPM-BPE and Unigram vocabularies (tests/test_export_spm.py), 33 probe strings each:
    - "never" with split=false is what add_space_prefix=false does: 33 of 33 identical.
    - "first" and "always" add no '▁' where the text already starts with a space (or a '▁'), so " x" is "▁x";
      llama.cpp's add_space_prefix always prepends one (" x" -> "▁▁x"), and after every special token, where
      "first" adds none: 22-24 of 33 identical with add_space_prefix=true, 6-7 with false.
    - split=true cuts the text before every '▁', so no piece can span a word boundary; llama.cpp's SPM and UGM
      tokenize the whole text: identical only when no piece holds a '▁' past its first character.
    """
    for n in _tokenizer_nodes(tok_json):
        if n.get("type") != "Metaspace":
            continue
        if n.get("replacement", "▁") != "▁":
            return f"Metaspace replacement {n['replacement']!r} (llama.cpp escapes spaces as '▁')"
        scheme = _prepend_scheme(n)
        if scheme != "never":
            return (
                f"Metaspace prepend_scheme {scheme!r} adds no '▁' before a leading space"
                + (" or after a special token" if scheme == "first" else "")
                + ", where llama.cpp's add_space_prefix always does"
            )
        inner = next((p for p in pieces if "▁" in p[1:]), None)
        if n.get("split", True) and inner is not None:
            return f"Metaspace split=true never forms pieces such as {inner!r}, which llama.cpp does"
    return None


# llama.cpp sets tokenizer attributes from general.name (src/llama-vocab.cpp): a name containing "phi3" or
# "phi-3" strips whitespace after every special token but <unk>, <s> and <|endoftext|> (Phi-3's HF added
# tokens have rstrip=True). Nothing else in the file says so: the name must match the tokenizer's behaviour.
RSTRIP_NAMES = ("phi-3", "phi3")


def gguf_model_name(name: str, tok_json: dict[str, Any]) -> str:
    """general.name such that llama.cpp's name-keyed rstrip applies exactly when HF's added tokens rstrip."""
    rstrip = any(a.get("special") and a.get("rstrip") for a in tok_json.get("added_tokens", []))
    clean = name
    for key in RSTRIP_NAMES:
        clean = re.sub(re.escape(key), key.replace("phi", "phi_"), clean, flags=re.IGNORECASE)
    return f"{clean}-phi3" if rstrip else clean
