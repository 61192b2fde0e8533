"""GGUF export: our own writer on the ``gguf`` package, then llama.cpp's quantizer through llama-cpp-python.

    write_gguf("students/tiny/model", "exports/tiny/gguf/model-f16.gguf")          # f16, norms F32
    quantize_gguf("exports/.../model-f16.gguf", "exports/.../model-q8_0.gguf", "q8_0")

No converter ships with llama-cpp-python or gguf, so this module does what llama.cpp's convert_hf_to_gguf.py
does for the llama architecture: permute q/k projections into llama.cpp's rotary layout, omit output.weight
when embeddings are tied, and describe the byte-level BPE tokenizer so that llama.cpp tokenizes exactly like
the Hugging Face tokenizer (checked at export time by export.parity).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from nestling.serve.errors import NestlingError
from nestling.serve.prompting import CHAT_TEMPLATE

log = logging.getLogger(__name__)

# name -> llama_ftype (llama.h); the values are stable across llama.cpp releases.
QUANT_TYPES: dict[str, int] = {"q8_0": 7, "q4_k_m": 15, "q4_0": 2, "q5_k_m": 17, "q6_k": 18}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NestlingError(f"{path}: not valid JSON ({e}); the student directory is corrupt") from None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rotary layout (as convert_hf_to_gguf.py).

    For k, n_head is the number of key/value heads (GQA).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def detect_pre_tokenizer(tok_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json.

    ByteLevel alone is GPT-2's regex ("gpt-2"); digits split one by one before ByteLevel is SmolLM2's
    ("smollm", what the bundled SmolLM2 GGUF declares). Anything else is refused rather than guessed,
    because a wrong value silently changes how llama.cpp splits digits.
    """
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    raise NestlingError(
        f"pre-tokenizer {types} is not one llama.cpp is known to reproduce; use a byte-level BPE "
        "tokenizer (distill.students.train_tokenizer) or pass the llama.cpp name with --gguf-pre"
    )


def _tokenizer_fields(model_dir: Path, vocab_size: int, pre: str | None) -> dict[str, Any]:
    """Tokens, types, merges and special ids for the GGUF, read from tokenizer.json."""
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise NestlingError(f"{model_dir}: no tokenizer.json; save the student with its fast tokenizer")
    tj = _read_json(tok_path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise NestlingError(f"{tok_path}: {model.get('type')} tokenizer; GGUF export supports byte-level BPE")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    special_ids: set[int] = set()
    user_ids: set[int] = set()
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        (special_ids if added.get("special") else user_ids).add(added["id"])
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * n
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, t in enumerate(tokens):
        if t is None:  # the embedding is padded past the tokenizer: llama.cpp wants a name for every row
            tokens[i] = f"[PAD{i}]"
            types.append(5)  # UNUSED
        else:
            types.append(3 if i in special_ids else 4 if i in user_ids else 1)  # CONTROL / USER / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    cfg = _read_json(model_dir / "tokenizer_config.json")
    by_text = {t: i for i, t in enumerate(tokens)}

    def special(name: str) -> int | None:
        v = cfg.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return by_text.get(v) if v is not None else None

    # add_bos: does the HF tokenizer's post-processor put bos in front? (SmolLM2's does not.)
    post = json.dumps(tj.get("post_processor") or {})
    bos = special("bos_token")
    bos_text = tokens[bos] if bos is not None else None
    add_bos = bool(bos_text) and json.dumps(bos_text) in post
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": pre or detect_pre_tokenizer(tj),
        "bos": bos,
        "eos": special("eos_token"),
        "pad": special("pad_token"),
        "unk": special("unk_token"),
        "add_bos": add_bos,
    }


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


def write_gguf(
    model_dir: str | Path, out_path: str | Path, dtype: str = "f16", pre: str | None = None
) -> Path:
    """Write a llama-architecture student as GGUF (dtype f16 or f32; 1-D tensors always F32)."""
    import gguf

    if dtype not in ("f16", "f32"):
        raise NestlingError(f"GGUF base dtype {dtype!r}: use f16 or f32")
    d = Path(model_dir)
    cfg = _read_json(d / "config.json")
    if cfg.get("model_type") != "llama":
        raise NestlingError(f"{d}: model_type {cfg.get('model_type')!r}; GGUF export supports llama students")
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    vocab_size = int(cfg["vocab_size"])
    if cfg.get("rope_scaling"):
        raise NestlingError(f"{d}: rope_scaling {cfg['rope_scaling']} is not supported by this exporter")
    tokf = _tokenizer_fields(d, vocab_size, pre)
    gen = _read_json(d / "generation_config.json")
    eos = gen.get("eos_token_id", tokf["eos"])
    eos = eos[0] if isinstance(eos, list) else eos
    tensors = _load_tensors(d)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines repeat what we log below
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(cfg.get("_name_or_path") and Path(cfg["_name_or_path"]).name or d.parent.name or "student")
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
        w.add_vocab_size(len(tokf["tokens"]))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokf["pre"])
        w.add_token_list(tokf["tokens"])
        w.add_token_types(tokf["types"])
        w.add_token_merges(tokf["merges"])
        for key, add in (
            ("bos", w.add_bos_token_id),
            ("pad", w.add_pad_token_id),
            ("unk", w.add_unk_token_id),
        ):
            if tokf[key] is not None:
                add(int(tokf[key]))
        if eos is not None:
            w.add_eos_token_id(int(eos))
        w.add_add_bos_token(tokf["add_bos"])
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        w.add_chat_template(CHAT_TEMPLATE)

        for hf_name, arr in tensors.items():
            if hf_name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd for the output when output.weight is absent
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise NestlingError(
                    f"{d}: tensor {hf_name!r} has no llama.cpp name; is this a plain llama model?"
                )
            if hf_name.endswith("q_proj.weight"):
                arr = permute_qk(arr, n_head)
            elif hf_name.endswith("k_proj.weight"):
                arr = permute_qk(arr, n_kv)
            # Norms (1-D) stay F32: llama.cpp expects it and they cost nothing.
            arr = arr.astype(np.float16 if dtype == "f16" and arr.ndim > 1 else np.float32)
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors, pre=%s, add_bos=%s)", out, len(tensors), tokf["pre"], tokf["add_bos"])
    return out


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
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise NestlingError(
            f"llama.cpp could not quantize {src} to {qtype} (code {rc}); is the f16 GGUF valid?"
        )
    os.replace(tmp, dst)
    return dst
