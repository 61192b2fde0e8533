"""GGUF export: our writer's metadata and layout, and peers that must accept the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nestling.export.gguf import detect_pre_tokenizer, permute_qk
from nestling.serve.engines import load_engine
from peers import llama_cpp_server

from nestling.core.prompting import CHAT_TEMPLATE, student_prompt

GGUFS = ["model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"]


def _fields(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    kv = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            kv[k] = f.contents()
        elif not k.startswith("GGUF."):
            kv[k] = f.contents()
    return kv, {t.name: t.tensor_type.name for t in r.tensors}


def test_permute_qk_matches_llama_cpp_layout():
    # HF keeps each head's rotary pairs as (i, i + d/2); llama.cpp wants them interleaved (2i, 2i + 1).
    n_head, d, cols = 3, 8, 5
    w = np.arange(n_head * d * cols, dtype=np.float32).reshape(n_head * d, cols)
    p = permute_qk(w, n_head)
    for h in range(n_head):
        for i in range(d // 2):
            assert (p[h * d + 2 * i] == w[h * d + i]).all()
            assert (p[h * d + 2 * i + 1] == w[h * d + i + d // 2]).all()


def test_pre_tokenizer_detection():
    assert detect_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}],
        }
    }
    assert detect_pre_tokenizer(smollm) == "smollm"
    from nestling.core.errors import NestlingError

    with pytest.raises(NestlingError, match="--gguf-pre"):
        detect_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def test_f16_metadata(tiny_export_dir: Path, tiny_student_dir: Path):
    cfg = json.loads((tiny_student_dir / "config.json").read_text())
    tok = json.loads((tiny_student_dir / "tokenizer.json").read_text())
    kv, tensors = _fields(tiny_export_dir / "gguf" / "model-f16.gguf")
    assert kv["general.architecture"] == "llama"
    assert kv["llama.block_count"] == cfg["num_hidden_layers"]
    assert kv["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert kv["llama.attention.head_count_kv"] == cfg["num_key_value_heads"] != cfg["num_attention_heads"]
    assert kv["llama.context_length"] == cfg["max_position_embeddings"]
    assert kv["llama.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.ggml.bos_token_id"] == cfg["bos_token_id"]
    assert kv["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
    assert kv["tokenizer.ggml.padding_token_id"] == cfg["pad_token_id"]
    assert kv["tokenizer.chat_template"] == "{{- bos_token -}}" + CHAT_TEMPLATE  # chat servers add no bos
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg["vocab_size"]
    for added in tok["added_tokens"]:
        assert tokens[added["id"]] == added["content"] and types[added["id"]] == 3  # CONTROL
    assert types[tok["model"]["vocab"]["Ġ1"]] == 1
    merges = tok["model"]["merges"]
    assert kv["tokenizer.ggml.merges"][:5] == [m if isinstance(m, str) else " ".join(m) for m in merges[:5]]
    assert "output.weight" not in tensors  # tied embeddings
    assert {tensors[n] for n in tensors if n.endswith("norm.weight")} == {"F32"}
    assert tensors["token_embd.weight"] == tensors["blk.0.attn_q.weight"] == "F16"


def test_quantized_types(tiny_export_dir: Path):
    _, q8 = _fields(tiny_export_dir / "gguf" / "model-q8_0.gguf")
    _, q4 = _fields(tiny_export_dir / "gguf" / "model-q4_k_m.gguf")
    assert q8["blk.0.attn_q.weight"] == "Q8_0"
    assert q4["blk.0.attn_q.weight"] == "Q4_K"  # hidden 256: K-quants apply
    assert q4["blk.0.ffn_norm.weight"] == "F32"


@pytest.mark.parametrize("name", GGUFS)
def test_llama_cpp_loads_every_gguf(tiny_export_dir: Path, name: str):
    e = load_engine(tiny_export_dir / "gguf" / name, kind="gguf")
    try:
        out = list(e.stream(e.tokenize(student_prompt("What is 2 + 2?")), 16))
        assert out and all(0 <= t < e.n_vocab for t in out) and e.eos_id not in out
        ids = e.tokenize("What is")
        assert e.logits(ids).shape == (len(ids), e.n_vocab)
    finally:
        e.close()


def test_transformers_loads_f16_gguf_and_matches_pytorch(tiny_export_dir: Path, tiny_student_dir: Path):
    import torch
    from nestling.distill.students import load_student
    from transformers import AutoModelForCausalLM

    model, tok = load_student(tiny_student_dir)
    gg = AutoModelForCausalLM.from_pretrained(tiny_export_dir / "gguf", gguf_file="model-f16.gguf")
    ids = torch.tensor([tok(student_prompt("What is 5 + 3?") + "\nStep 1: 5 + 3 = 8")["input_ids"]])
    with torch.inference_mode():
        a, b = model(ids).logits, gg(ids).logits
    # transformers de-permutes q/k and dequantizes f16 -> fp32: only f16 rounding of weights remains.
    assert (a - b).abs().max().item() < 0.05
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
def test_llama_cpp_server_serves_f16_with_same_greedy_tokens(tiny_export_dir: Path, tmp_path: Path):
    import httpx

    path = tiny_export_dir / "gguf" / "model-f16.gguf"
    with llama_cpp_server(path, tmp_path / "server.log", n_ctx=256) as url:
        e = load_engine(path, kind="gguf")
        for q in ["What is 3 + 4?", "What is 9 - 2?"]:
            prompt = student_prompt(q)
            want = list(e.stream(e.tokenize(prompt), 24))
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "repeat_penalty": 1.0, "top_k": 1}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            assert r["choices"][0]["text"] == e.detokenize(want)
            assert r["usage"]["completion_tokens"] == len(want)
            assert r["choices"][0]["finish_reason"] == ("stop" if len(want) < 24 else "length")
        e.close()


@pytest.mark.slow
def test_pretrained_smollm2_student_gqa_and_its_tokenizer(tmp_path: Path):
    """SmolLM2 (vocab 49152, hidden 576, GQA 9/3), depth-pruned to 2 layers: the writer's GQA permutation and
    its tokenizer must hold; K-quant rows of 576 fall back, which is fine."""
    import torch
    from nestling.distill.students import init_student, save_student
    from nestling.export.pipeline import ExportConfig, export_student

    from tests.test_engines import tricky_texts

    torch.set_num_threads(1)
    model, tok = init_student("gguf:smollm2?keep_layers=2")
    student = save_student(model, tok, tmp_path / "smol" / "model")
    out = tmp_path / "export"
    cfg = ExportConfig(
        student=str(student),
        out=str(out),
        variants=["onnx-fp32", "gguf-f16", "gguf-q8_0"],
        parity_prompts=4,
        max_new_tokens=24,
    )
    m = export_student(cfg)  # raises if f16 GGUF or fp32 ONNX did not match PyTorch
    assert m["variants"]["gguf-f16"]["parity"]["greedy_match_within_tol"] == 1.0
    kv, tensors = _fields(out / "gguf" / "model-f16.gguf")
    assert kv["llama.attention.head_count"] == 9 and kv["llama.attention.head_count_kv"] == 3
    assert kv["llama.vocab_size"] == len(kv["tokenizer.ggml.tokens"]) == 49152
    assert "output.weight" not in tensors
    for variant in ("gguf/model-f16.gguf", "onnx/fp32"):
        e = load_engine(out / variant)
        texts = tricky_texts(200, seed=1)
        assert [e.tokenize(t) for t in texts] == [tok(t)["input_ids"] for t in texts]
        e.close()
